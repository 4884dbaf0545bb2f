#!/bin/sh
# Writes the cpu-dev overlay's credentials into secrets/ (ignored by git): random S3 keys shared by the in-cluster
# S3 server and every taxonet pod, and a random API token. kustomize's secretGenerator turns them into the Secrets
# taxonet-s3 and taxonet-api-token; `kubectl apply -k` fails with "secrets/s3.env: no such file" until this ran.
# Existing files are kept (delete them to rotate); the S3 keys must not change while the S3 server keeps its data.
set -eu
cd "$(dirname "$0")/secrets"
random() { LC_ALL=C tr -dc 'A-Za-z0-9' </dev/urandom | head -c "$1"; }
umask 077
if [ ! -f s3.env ]; then
  cat > s3.env <<EOT
AWS_ACCESS_KEY_ID=taxonet$(random 13)
AWS_SECRET_ACCESS_KEY=$(random 40)
AWS_REGION=us-east-1
AWS_ENDPOINT_URL_S3=http://taxonet-s3:7070
EOT
  echo "wrote $(pwd)/s3.env"
else
  echo "kept $(pwd)/s3.env"
fi
if [ ! -f api-token.env ]; then
  echo "TAXONET_API_TOKEN=$(random 48)" > api-token.env
  echo "wrote $(pwd)/api-token.env"
else
  echo "kept $(pwd)/api-token.env"
fi
