"""gRPC servicer, server, hot reload, interceptors, metrics and client."""
