"""
The twistd plugins: C{twistd oaiproxy} (the proxy) and C{twistd oaiproxy-mock} (the fake
OpenAI upstream). Nothing else lives here; the logic is in L{oaiproxy.tap} and
L{oaiproxy.mock}.
"""

from __future__ import annotations

from twisted.application.service import IService, IServiceMaker
from twisted.plugin import IPlugin
from twisted.python import usage
from zope.interface import implementer


@implementer(IServiceMaker, IPlugin)
class _ProxyServiceMaker:
    tapname = "oaiproxy"
    description = "Reverse proxy for the OpenAI API: HTTP/2 + HTTP/1.1, streaming, balancing."

    @property
    def options(self) -> type[usage.Options]:
        from oaiproxy.tap import Options

        return Options

    def makeService(self, options: usage.Options) -> IService:
        from oaiproxy.tap import makeService

        return makeService(options)  # type: ignore[arg-type]


@implementer(IServiceMaker, IPlugin)
class _MockServiceMaker:
    tapname = "oaiproxy-mock"
    description = "A fake OpenAI-compatible upstream for demos, tests and benchmarks."

    @property
    def options(self) -> type[usage.Options]:
        from oaiproxy.mock import MockOptions

        return MockOptions

    def makeService(self, options: usage.Options) -> IService:
        from twisted.internet import reactor

        from oaiproxy.mock import make_mock_service, tune_mock_collector

        service = make_mock_service(options, reactor)  # type: ignore[arg-type]
        tune_mock_collector(reactor)
        return service


oaiproxy = _ProxyServiceMaker()
oaiproxy_mock = _MockServiceMaker()
