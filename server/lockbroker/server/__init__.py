"""The lockbroker server."""

from lockbroker.server.logs import quiet_grpc_core

# Before anything imports grpc: the C core reads GRPC_VERBOSITY once, when it loads.
quiet_grpc_core()
