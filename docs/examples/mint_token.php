<?php
// Mint a webchat token (an HS256 JWT) with PHP's own functions only.
//
// In your app:   require 'mint_token.php';
//                $token = chat_token($secret, $user_id, $display_name, ['lobby', 'team-*']);
// From a shell:  php mint_token.php SECRET_FILE USER [NAME [ROOM,ROOM...]]
//                (WEBCHAT_TOKEN_TTL: seconds until it expires, default 3600)

function base64url(string $bytes): string
{
    return rtrim(strtr(base64_encode($bytes), '+/', '-_'), '=');
}

function chat_token(string $secret, string $user, ?string $name = null,
                       ?array $rooms = null, int $ttl = 3600): string
{
    $now = time();
    $claims = ['sub' => $user, 'iat' => $now, 'exp' => $now + $ttl];
    if ($name !== null) {
        $claims['name'] = $name;
    }
    if ($rooms !== null) {
        $claims['rooms'] = array_values($rooms);  // a JSON list, even if empty
    }
    $flags = JSON_UNESCAPED_SLASHES | JSON_UNESCAPED_UNICODE | JSON_THROW_ON_ERROR;
    $signed = base64url(json_encode(['alg' => 'HS256', 'typ' => 'JWT'], $flags))
        . '.' . base64url(json_encode($claims, $flags));
    return $signed . '.' . base64url(hash_hmac('sha256', $signed, $secret, true));
}

// The secret file without surrounding whitespace, as webchat reads --jwt-secret-file.
function read_secret(string $path): string
{
    return trim(file_get_contents($path));
}

if (PHP_SAPI === 'cli' && realpath($argv[0]) === __FILE__) {
    if ($argc < 3) {
        fwrite(STDERR, "usage: php mint_token.php SECRET_FILE USER [NAME [ROOM,ROOM...]]\n");
        exit(2);
    }
    $rooms = isset($argv[4]) ? array_filter(explode(',', $argv[4]), 'strlen') : null;
    $ttl = (int) (getenv('WEBCHAT_TOKEN_TTL') ?: 3600);
    echo chat_token(read_secret($argv[1]), $argv[2], $argv[3] ?? null, $rooms, $ttl), "\n";
}
