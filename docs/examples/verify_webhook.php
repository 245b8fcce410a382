<?php
// Check that a webhook request comes from webchat, and is fresh.
//
// As your webhook endpoint (php -S, php-fpm): answers 204, or 400 for a forgery.
// From a shell:  php verify_webhook.php TIMESTAMP SIGNATURE < body.json
//   WEBCHAT_WEBHOOK_SECRET_FILE  the file given to --webhook-secret-file

const WEBCHAT_WEBHOOK_MAX_AGE = 300;  // seconds: older (or later) requests are replays

function webhook_valid(string $secret, string $body, string $timestamp,
                               string $signature_header, ?int $now = null): bool
{
    if (!ctype_digit($timestamp)
        || abs(($now ?? time()) - (int) $timestamp) > WEBCHAT_WEBHOOK_MAX_AGE) {
        return false;
    }
    $expected = 'v1=' . hash_hmac('sha256', $timestamp . '.' . $body, $secret);
    // Several signatures, comma-separated, while a secret is being rotated.
    foreach (explode(',', $signature_header) as $signature) {
        if (hash_equals($expected, trim($signature))) {
            return true;
        }
    }
    return false;
}

$secret = trim(explode("\n", file_get_contents(getenv('WEBCHAT_WEBHOOK_SECRET_FILE')), 2)[0]);
if (PHP_SAPI === 'cli') {
    $body = stream_get_contents(STDIN);
    $timestamp = $argv[1] ?? '';
    $signature = $argv[2] ?? '';
} else {
    $body = file_get_contents('php://input');
    $timestamp = $_SERVER['HTTP_WEBCHAT_TIMESTAMP'] ?? '';
    $signature = $_SERVER['HTTP_WEBCHAT_SIGNATURE'] ?? '';
}
if (!webhook_valid($secret, $body, $timestamp, $signature)) {
    if (PHP_SAPI === 'cli') {
        fwrite(STDERR, "rejected\n");
        exit(1);
    }
    http_response_code(400);
    exit;
}
$event = json_decode($body, true);
// At least once: the same event may come again; keep $event['id'] to skip repeats.
if (PHP_SAPI === 'cli') {
    echo $event['type'], ' ', $event['id'], "\n";
} else {
    error_log("webchat event {$event['type']} {$event['id']}");
    http_response_code(204);
}
