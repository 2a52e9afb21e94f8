import subprocess
import sys


def test_bench_client_and_fake_worker_never_import_torch():
    code = (
        "import sys, bench.cli, bench.fake_worker, "
        "bench.fake_stack; "
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
