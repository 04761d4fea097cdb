#!/usr/bin/env sh
# The one command that generates the gRPC stubs: protos/rpc/** -> the ignored rpc/ package.
# Used by `make proto` and the Dockerfile. PYTHON names the interpreter (default: python).
set -eu
cd "$(dirname "$0")/.."
rm -rf rpc
"${PYTHON:-python}" -m grpc_tools.protoc -Iprotos --python_out=. --grpc_python_out=. --pyi_out=. \
    protos/rpc/v1/*.proto protos/rpc/internal/v1/*.proto
