# Publish with curl (WEBCHAT_URL and WEBCHAT_API_KEY_FILE as for publish.py).
curl --silent --show-error --fail-with-body \
  -H "Authorization: Bearer $(head -n 1 "$WEBCHAT_API_KEY_FILE")" \
  -H 'Content-Type: application/json' \
  --data-binary '{"text": "Deploy finished", "idempotency_key": "deploy-1234"}' \
  "${WEBCHAT_URL:-http://127.0.0.1:8080}/api/rooms/lobby/messages"
