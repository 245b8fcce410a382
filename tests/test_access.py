"""Origin policy and the client's address behind trusted proxies."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from webchat.access import AccessPolicy, canonical_address, normalize_origin


class OriginTests(SynchronousTestCase):
    def test_normalize(self):
        self.assertEqual(
            normalize_origin("HTTP://Example.COM"), "http://example.com:80"
        )
        self.assertEqual(normalize_origin("https://a.b:8443"), "https://a.b:8443")
        self.assertIsNone(normalize_origin("null"))
        self.assertIsNone(normalize_origin("ftp://x"))
        self.assertIsNone(normalize_origin("http://x:99999"))

    def test_same_origin_only_by_default(self):
        policy = AccessPolicy()
        allowed = policy.origin_allowed
        self.assertTrue(allowed(None, "chat.example:8080", "http"))
        self.assertTrue(
            allowed("http://chat.example:8080", "chat.example:8080", "http")
        )
        self.assertTrue(allowed("http://chat.example", "chat.example", "http"))
        self.assertTrue(allowed("https://chat.example", "chat.example", "https"))
        self.assertFalse(allowed("http://evil.example", "chat.example", "http"))
        self.assertFalse(
            allowed("http://chat.example:9999", "chat.example:8080", "http")
        )
        # Scheme counts: an http page may not talk to the https site.
        self.assertFalse(allowed("http://chat.example", "chat.example", "https"))
        self.assertFalse(allowed("null", "chat.example", "http"))
        self.assertFalse(allowed("http://chat.example", None, "http"))

    def test_allowed_origins_and_star(self):
        policy = AccessPolicy.from_options(["http://127.0.0.1:8000"])
        self.assertTrue(policy.origin_allowed("http://127.0.0.1:8000", "h:1", "http"))
        self.assertFalse(policy.origin_allowed("http://127.0.0.1:8001", "h:1", "http"))
        anyone = AccessPolicy.from_options(["*"])
        self.assertTrue(anyone.origin_allowed("http://evil.example", "h:1", "http"))

    def test_bad_origin_option_is_an_error(self):
        with self.assertRaises(ValueError):
            AccessPolicy.from_options(["not an origin"])


class ClientAddressTests(SynchronousTestCase):
    def test_forwarded_for_ignored_from_untrusted_peers(self):
        policy = AccessPolicy.from_options(proxies=["10.0.0.1"])
        self.assertEqual(policy.client_address("192.0.2.7", "203.0.113.9"), "192.0.2.7")

    def test_rightmost_untrusted_hop_is_the_client(self):
        policy = AccessPolicy.from_options(proxies=["10.0.0.0/8"])
        header = "1.1.1.1, 203.0.113.9, 10.0.0.2"
        self.assertEqual(policy.client_address("10.0.0.1", header), "203.0.113.9")

    def test_ipv4_mapped_addresses_are_plain_ipv4(self):
        # A dual-stack socket (the shipped webchat.socket) reports IPv4
        # clients as ::ffff:a.b.c.d; --trust-proxy 127.0.0.1 must still match.
        policy = AccessPolicy.from_options(proxies=["127.0.0.1"])
        self.assertTrue(policy.is_trusted_proxy("::ffff:127.0.0.1"))
        self.assertEqual(
            policy.client_address("::ffff:127.0.0.1", "::ffff:203.0.113.9"),
            "203.0.113.9",
        )
        self.assertEqual(canonical_address("::ffff:192.0.2.1"), "192.0.2.1")
        self.assertEqual(canonical_address("2001:db8::1"), "2001:db8::1")

    def test_garbage_header_is_accounted_to_the_proxy(self):
        policy = AccessPolicy.from_options(proxies=["127.0.0.1"])
        self.assertEqual(policy.client_address("127.0.0.1", "x\ny"), "127.0.0.1")
        self.assertEqual(policy.client_address("127.0.0.1", None), "127.0.0.1")
