"""Header translation: hop-by-hop rules, Host, forwarding headers, validation."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from oaiproxy.errors import InvalidRequest
from oaiproxy.http import headers as header_module
from oaiproxy.http.headers import (
    MAX_RETRY_AFTER,
    downstream_response_headers,
    for_log,
    is_valid_name,
    retry_after,
    upstream_request_headers,
)


def up(client: Headers, **kw: object) -> Headers:
    args: dict[str, object] = {
        "host": b"up:9000",
        "api_key": None,
        "client_ip": "10.1.2.3",
        "secure": True,
        "request_id": b"rid",
        "stream": False,
    }
    args.update(kw)
    return upstream_request_headers(client, **args)  # type: ignore[arg-type]


class UpstreamRequestHeadersTests(SynchronousTestCase):
    """Client headers on their way upstream."""

    def test_hop_by_hop_dropped(self) -> None:
        """Connection, what it names, Keep-Alive, Proxy-*, TE, Trailer, TE, Upgrade go."""
        client = Headers(
            {
                b"connection": [b"keep-alive, X-Secret-Hop"],
                b"x-secret-hop": [b"1"],
                b"keep-alive": [b"timeout=5"],
                b"proxy-authorization": [b"Basic x"],
                b"proxy-foo": [b"any Proxy-* header"],
                b"te": [b"trailers"],
                b"trailer": [b"x"],
                b"transfer-encoding": [b"chunked"],
                b"upgrade": [b"h2c"],
                b"content-length": [b"12"],
                b"expect": [b"100-continue"],
                b"x-keep": [b"yes"],
            }
        )
        out = up(client)
        names = {n.lower() for n, _ in out.getAllRawHeaders()}
        self.assertEqual(
            names,
            {
                b"x-keep",
                b"host",
                b"x-forwarded-for",
                b"x-forwarded-proto",
                b"x-request-id",
            },
        )

    def test_host_from_upstream(self) -> None:
        """Host is the upstream's, whatever the client said."""
        out = up(Headers({b"host": [b"evil.example"]}))
        self.assertEqual(out.getRawHeaders(b"host"), [b"up:9000"])

    def test_forwarded_headers(self) -> None:
        """X-Forwarded-For appends the client address; X-Forwarded-Proto says https."""
        out = up(Headers({b"x-forwarded-for": [b"1.1.1.1"]}))
        self.assertEqual(out.getRawHeaders(b"x-forwarded-for"), [b"1.1.1.1, 10.1.2.3"])
        self.assertEqual(out.getRawHeaders(b"x-forwarded-proto"), [b"https"])

    def test_key_injection(self) -> None:
        """An upstream key replaces the client's Authorization; without one it passes."""
        client = Headers({b"authorization": [b"Bearer client"]})
        self.assertEqual(
            up(client, api_key=b"sk-up").getRawHeaders(b"authorization"), [b"Bearer sk-up"]
        )
        self.assertEqual(up(client).getRawHeaders(b"authorization"), [b"Bearer client"])

    def test_stream_asks_identity(self) -> None:
        """A streamed request asks the upstream not to compress."""
        client = Headers({b"accept-encoding": [b"gzip"]})
        self.assertEqual(up(client, stream=True).getRawHeaders(b"accept-encoding"), [b"identity"])
        self.assertEqual(up(client).getRawHeaders(b"accept-encoding"), [b"gzip"])

    def test_invalid_rejected(self) -> None:
        """A NUL in a value cannot go out as HTTP/1.1 (Headers turns CR/LF to spaces)."""
        for headers in (
            Headers({b"x-a": [b"nul\x00"]}),
            Headers({b"x-forwarded-for": [b"1.2.3.4\x00"]}),
        ):
            self.assertRaises(InvalidRequest, up, headers)

    def test_bad_value_named_among_good_ones(self) -> None:
        """The one scan of all values finds a NUL anywhere, and the error names its header."""
        headers = Headers({b"x-a": [b"1", b"2"], b"x-b": [b"ok", b"n\x00ul"], b"x-c": [b"3"]})
        with self.assertRaises(InvalidRequest) as caught:
            up(headers)
        self.assertIn("X-B", caught.exception.message)

    def test_name_table_bounded(self) -> None:
        """Past the table's size, client field names are still handled, but not kept."""
        from oaiproxy.http import headers as module

        self.patch(module, "_UP_NAMES", {})
        self.patch(module, "_MAX_NAMES", 2)
        client = Headers({b"x-%d" % i: [b"v"] for i in range(6)})
        # and Host, X-Forwarded-For, X-Forwarded-Proto, x-request-id:
        self.assertEqual(len(list(up(client).getAllRawHeaders())), 6 + 4)
        self.assertEqual(len(module._UP_NAMES), 2)

    def test_name_validation(self) -> None:
        """Only RFC 9110 tokens are valid names (Twisted's Headers refuses the rest earlier)."""
        self.assertTrue(is_valid_name(b"X-Request-Id"))
        for bad in (b"bad name", b"a:b", b"", b"a\r", "é".encode()):
            self.assertFalse(is_valid_name(bad), bad)


class DownstreamResponseHeadersTests(SynchronousTestCase):
    """Upstream response headers on their way back."""

    def test_framing_and_hop_dropped(self) -> None:
        """Framing and hop-by-hop go; end-to-end headers such as x-ratelimit-* stay."""
        upstream = Headers(
            {
                b"content-length": [b"5"],
                b"transfer-encoding": [b"chunked"],
                b"connection": [b"close"],
                b"server": [b"uvicorn"],
                b"x-ratelimit-remaining-requests": [b"99"],
                b"openai-processing-ms": [b"12"],
            }
        )
        names = {n.lower() for n, _ in downstream_response_headers(upstream)}
        self.assertEqual(names, {b"x-ratelimit-remaining-requests", b"openai-processing-ms"})

    def test_unsafe_dropped(self) -> None:
        """A value with a NUL is not relayed."""
        upstream = Headers({b"x-a": [b"a\x00b"], b"x-b": [b"ok"]})
        self.assertEqual(
            [(n.lower(), v) for n, v in downstream_response_headers(upstream)], [(b"x-b", b"ok")]
        )


class RetryAfterTests(SynchronousTestCase):
    """How long an upstream asks to be left alone."""

    def test_values(self) -> None:
        """Seconds, OpenAI's milliseconds (preferred), an HTTP date; capped; else None."""
        now = 1_700_000_000.0  # 2023-11-14T22:13:20Z
        date = b"Tue, 14 Nov 2023 22:13:50 GMT"
        for headers, expected in (
            ({b"retry-after": [b"7"]}, 7.0),
            ({b"retry-after": [b"7"], b"retry-after-ms": [b"250"]}, 0.25),
            ({b"retry-after": [date]}, 30.0),
            ({b"retry-after": [b"86400"]}, MAX_RETRY_AFTER),
            ({b"retry-after": [b"0"]}, None),
            ({b"retry-after": [b"soon"]}, None),
            ({b"retry-after-ms": [b"nan"]}, None),
            ({b"retry-after-ms": [b"soon"], b"retry-after": [b"5"]}, 5.0),
            ({b"retry-after-ms": [b"-1"], b"retry-after": [b"5"]}, 5.0),
            ({b"retry-after": [b"Tue, 14 Nov 2023 22:00:00 GMT"]}, None),
            ({}, None),
        ):
            self.assertEqual(retry_after(Headers(headers), now), expected, headers)


class ForLogTests(SynchronousTestCase):
    """Client text written into log lines."""

    def test_control_characters_escaped(self) -> None:
        """C0 controls, DEL and C1 controls become escapes; the rest is kept."""
        self.assertEqual(
            for_log("a\rb\nc\x00d\x1b[31m\x7f\x9b é/v1"),
            "a\\x0db\\x0ac\\x00d\\x1b[31m\\x7f\\x9b é/v1",
        )

    def test_capped(self) -> None:
        """At most the limit, counted before escaping."""
        self.assertEqual(for_log("x" * 500), "x" * 200)
        self.assertEqual(for_log("\n" * 3, limit=2), "\\x0a\\x0a")


class CanonicalNameTests(SynchronousTestCase):
    """Header names as Twisted's Headers keep them, without a call of its encoder each."""

    def test_same_as_twisted(self) -> None:
        from twisted.web.http_headers import InvalidHeaderName, _nameEncoder

        for name in [b"content-type", b"X-REQUEST-ID", b"www-authenticate", b"te", b"a-b-c"]:
            self.assertEqual(header_module.canonical(name), _nameEncoder.encode(name))
            self.assertEqual(header_module.canonical(name), _nameEncoder.encode(name))  # cached
        with self.assertRaises(InvalidHeaderName):
            header_module.canonical(b"bad name")

    def test_long_names_not_kept(self) -> None:
        name = b"x-" + b"l" * 100
        self.assertEqual(header_module.canonical(name), b"X-L" + b"l" * 99)
        self.assertNotIn(name, header_module._CANONICAL)

    def test_raw_values(self) -> None:
        """As getRawHeaders(name, []) for a canonical name."""
        fields = Headers({b"x-a": [b"1", b"2"]})
        self.assertEqual(header_module.raw_values(fields, b"X-A"), [b"1", b"2"])
        self.assertEqual(header_module.raw_values(fields, b"X-B"), [])
