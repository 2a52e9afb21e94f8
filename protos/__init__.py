"""tandem.v1 protobuf / gRPC code, generated from the .proto files in this folder.

The generated *_pb2*.py files are not committed: `pip install` (setup.py build_py) writes them,
and `python -m protos.build` writes them again after a .proto changes.
"""
