"""
Listening on the configured endpoints, as a service that refuses to start when it cannot.

Twisted's C{StreamServerEndpointService} logs a failed listen (a port already taken, an
address the machine does not have) and carries on: the process would run listening nowhere,
and a supervisor would take it for up. Here a listener that cannot listen stops the start
with a one-line message naming the address and the reason (twistd prints it and exits with
status 1), the listeners already open are closed, and once all listen each one's real
address is logged (the port the system chose for port 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from typing_extensions import override

__all__ = ["CannotListen", "Endpoint", "Listeners"]

log = Logger()


class CannotListen(SystemExit, Exception):
    """
    An endpoint cannot listen: the start stops with this one-line message.

    A L{SystemExit}, so that C{twistd -n} prints the message alone and exits with status 1;
    an L{Exception} too, so that a daemonizing twistd (which forks before services start)
    hands it to its parent through its status pipe, removes the pid file and exits 1,
    rather than leaving the parent waiting.
    """


@dataclass(frozen=True)
class Endpoint:
    """
    One place to listen.

    @ivar endpoint: where to listen.
    @ivar where: the configured address, for messages (e.g. C{127.0.0.1:8080}).
    @ivar what: what is served there, for the log (e.g. C{http (http/1.1)}).
    @ivar factory: what serves the connections there, if not the listeners' own factory.
    """

    endpoint: IStreamServerEndpoint
    where: str
    what: str
    factory: IProtocolFactory | None = None


def _address(port: IListeningPort) -> str:
    host: Any = port.getHost()
    address = str(getattr(host, "host", host))
    if ":" in address:
        address = f"[{address}]"
    number = getattr(host, "port", None)
    return address if number is None else f"{address}:{number}"


def _reason(failure: Failure) -> str:
    """Why listening failed: the system's words (Twisted's message repeats the address)."""
    socket_error = getattr(failure.value, "socketError", None)
    strerror = getattr(socket_error, "strerror", None)
    return str(strerror) if strerror else failure.getErrorMessage()


class Listeners(Service):
    """
    Listens with one factory on every endpoint (unless the endpoint names its own) when
    started; stops listening when stopped.

    Starting raises L{CannotListen} with a message naming the address when an endpoint cannot
    listen, or does not say at once whether it can (Twisted's TCP, TLS and UNIX endpoints
    always say at once).
    """

    def __init__(
        self, name: str, factory: IProtocolFactory, endpoints: Sequence[Endpoint]
    ) -> None:
        """
        @param name: the program, in messages (e.g. C{oaiproxy}).
        """
        self._name = name
        self._factory = factory
        self.endpoints = tuple(endpoints)
        self.ports: list[IListeningPort] | None = None

    @override
    def privilegedStartService(self) -> None:
        # Before twistd drops privileges: ports under 1024 need them.
        super().privilegedStartService()  # type: ignore[no-untyped-call]  # Twisted is unannotated
        self._listen()

    @override
    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        if self.ports is None:
            self._listen()
        assert self.ports is not None
        for port, endpoint in zip(self.ports, self.endpoints, strict=True):
            log.warn(
                "{name} listening on {address}: {what}",
                name=self._name,
                address=_address(port),
                what=endpoint.what,
            )

    @override
    def stopService(self) -> Deferred[Any]:
        super().stopService()  # type: ignore[no-untyped-call]
        ports, self.ports = self.ports or [], None
        return gatherResults([maybeDeferred(port.stopListening) for port in ports])

    def _listen(self) -> None:
        ports: list[IListeningPort] = []
        for endpoint in self.endpoints:
            outcome: list[IListeningPort | Failure] = []
            factory = self._factory if endpoint.factory is None else endpoint.factory
            endpoint.endpoint.listen(factory).addBoth(outcome.append)
            result = outcome[0] if outcome else None
            if result is not None and not isinstance(result, Failure):
                ports.append(result)
                continue
            for port in ports:
                port.stopListening()
            reason = "no answer from the endpoint" if result is None else _reason(result)
            message = f"{self._name}: cannot listen on {endpoint.where}: {reason}"
            # Also in the log: a daemonizing twistd shows its parent only 100 bytes of it.
            log.error("{message}", message=message)
            raise CannotListen(message)
        self.ports = ports
