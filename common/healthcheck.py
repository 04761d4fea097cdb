"""Exit 0 when a gRPC service reports SERVING (container healthchecks):
python -m common.healthcheck 127.0.0.1:50051 rpc.internal.v1.MemoryService"""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: list[str]) -> int:
    address, service = argv[0], argv[1] if len(argv) > 1 else ""
    try:
        with grpc.insecure_channel(address) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2
            )
    except grpc.RpcError as exc:
        print(f"{address} {service}: {exc.code().name}", file=sys.stderr)
        return 1
    return 0 if status.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
