#!/bin/sh
# Regenerates the Go code from the .proto files. Needs protoc and its well-known types (Debian:
# protobuf-compiler and libprotobuf-dev); the Go plugins are pinned as tools in go.mod.
set -eu
cd "$(dirname "$0")"
GEN_GO=$(go tool -n protoc-gen-go)
GEN_GRPC=$(go tool -n protoc-gen-go-grpc)
protoc -I . -I /usr/include \
  --plugin=protoc-gen-go="$GEN_GO" --plugin=protoc-gen-go-grpc="$GEN_GRPC" \
  --go_out=. --go_opt=paths=source_relative \
  --go-grpc_out=. --go-grpc_opt=paths=source_relative \
  $(find gitraft -name '*.proto' | sort)
