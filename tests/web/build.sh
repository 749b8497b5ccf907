#!/bin/sh
# Rebuilds src/gen/echo_pb.ts and dist/grpc-web-test.js from package-lock.json.
# Needs node >= 20 with npm, and protoc on PATH. The outputs are checked in, so CI needs none of this.
set -eu
cd "$(dirname "$0")"

npm ci --no-audit --no-fund

rm -rf src/gen
mkdir -p src/gen
protoc \
  --plugin=protoc-gen-es=node_modules/.bin/protoc-gen-es \
  --es_out=src/gen \
  --es_opt=target=ts,import_extension=none \
  -I ../../proto \
  ../../proto/echo.proto

node_modules/.bin/tsc -p .

node_modules/.bin/esbuild src/page.ts \
  --bundle \
  --format=iife \
  --platform=browser \
  --target=es2020 \
  --minify \
  --outfile=dist/grpc-web-test.js

ls -l dist/grpc-web-test.js
