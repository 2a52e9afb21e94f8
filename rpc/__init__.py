"""gRPC plumbing shared by every server and client: TLS credentials and channels."""
