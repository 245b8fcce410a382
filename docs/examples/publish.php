<?php
// Publish a message into a room through webchat's HTTP API.
//
// From a shell:  php publish.php ROOM TEXT [IDEMPOTENCY_KEY]
//   WEBCHAT_URL           the server, default http://127.0.0.1:8080
//   WEBCHAT_API_KEY_FILE  the file given to --api-key-file

function publish_message(string $base_url, string $api_key, string $room, string $text,
                         ?string $idempotency_key = null): array
{
    $body = ['text' => $text];
    if ($idempotency_key !== null) {
        $body['idempotency_key'] = $idempotency_key;  // a retry is not delivered twice
    }
    $context = stream_context_create(['http' => [
        'method' => 'POST',
        'header' => "Authorization: Bearer $api_key\r\nContent-Type: application/json\r\n",
        'content' => json_encode($body, JSON_UNESCAPED_UNICODE | JSON_THROW_ON_ERROR),
        'ignore_errors' => true,  // read the JSON error body of a 4xx/5xx too
        'timeout' => 10,
    ]]);
    $url = rtrim($base_url, '/') . '/api/rooms/' . rawurlencode($room) . '/messages';
    $answer = @file_get_contents($url, false, $context);
    if ($answer === false) {
        throw new RuntimeException("cannot reach $url");
    }
    $status = (int) explode(' ', $http_response_header[0])[1];
    $json = json_decode($answer, true);
    if ($status !== 202) {
        // {"error": "...", "detail": "..."}; 429 comes with Retry-After.
        throw new RuntimeException("$status " . ($json['error'] ?? '') . ': ' . ($json['detail'] ?? $answer));
    }
    return $json;  // ['room' => ..., 'offset' => ...]
}

if (PHP_SAPI === 'cli' && realpath($argv[0]) === __FILE__) {
    if ($argc < 3) {
        fwrite(STDERR, "usage: php publish.php ROOM TEXT [IDEMPOTENCY_KEY]\n");
        exit(2);
    }
    $api_key = trim(explode("\n", file_get_contents(getenv('WEBCHAT_API_KEY_FILE')), 2)[0]);
    try {
        $sent = publish_message(getenv('WEBCHAT_URL') ?: 'http://127.0.0.1:8080',
                                $api_key, $argv[1], $argv[2], $argv[3] ?? null);
    } catch (RuntimeException $e) {
        fwrite(STDERR, 'not published: ' . $e->getMessage() . "\n");
        exit(1);
    }
    echo json_encode($sent), "\n";
}
