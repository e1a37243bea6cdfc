"""The floor a Python relay cannot go below: trio copying bytes both ways, parsing nothing.

    python bench/naive_relay.py LISTEN_PORT UPSTREAM_PORT

Used by bench/run.py as a third column, so imapveil's cost can be told apart from trio's.
"""

from __future__ import annotations

import sys
from functools import partial

import trio


async def pump(source: trio.SocketStream, sink: trio.SocketStream) -> None:
    try:
        while data := await source.receive_some(256 * 1024):
            await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def handle(upstream_port: int, client: trio.SocketStream) -> None:
    server = await trio.open_tcp_stream("127.0.0.1", upstream_port)
    async with client, server, trio.open_nursery() as nursery:
        nursery.start_soon(pump, server, client)
        await pump(client, server)
        nursery.cancel_scope.cancel()


def main() -> None:
    listen, upstream = int(sys.argv[1]), int(sys.argv[2])
    trio.run(partial(trio.serve_tcp, partial(handle, upstream), listen, host="127.0.0.1"))


if __name__ == "__main__":
    main()
