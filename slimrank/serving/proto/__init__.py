"""Generated gRPC stubs of protos/ (make protos); do not edit."""
