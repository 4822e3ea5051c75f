"""The container's end of the isolated network's tunnel (standard library only).

`forward.py GRANT LISTENERS` binds each listener (`address:port=destination`, comma
separated) on the container's loopback, then forks: the parent returns as soon as every
listener is bound, so the entrypoint goes on; the child, in a session of its own (the
run's signals are not for it), carries each connection over the mounted Unix socket to
the worker host, opening it with the run's grant and the destination. The host decides
what is reached; this process only makes loopback addresses work as usual.
"""

import asyncio
import functools
import os
import socket
import sys

SOCKET = "/run/prefect-managed/tunnel.sock"


async def _pipe(source, sink):
    try:
        while True:
            chunk = await source.read(65536)
            if not chunk:
                break
            sink.write(chunk)
            await sink.drain()
        if sink.can_write_eof():
            sink.write_eof()
    except OSError:
        pass


async def _handle(grant, destination, reader, writer):
    try:
        up_reader, up_writer = await asyncio.open_unix_connection(SOCKET)
    except OSError as exc:
        print(f"prefect-managed: tunnel to {destination} unavailable: {exc}", file=sys.stderr)
        writer.close()
        return
    try:
        up_writer.write(f"{grant}\n{destination}\n".encode())
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
    finally:
        writer.close()
        up_writer.close()


async def _serve(grant, listeners):
    servers = [
        await asyncio.start_server(functools.partial(_handle, grant, destination), sock=sock)
        for sock, destination in listeners
    ]
    await asyncio.gather(*(server.serve_forever() for server in servers))


def listener(address, port):
    """A listening TCP socket whose connections send each write at once.

    Nagle's algorithm off: asyncio turns it off on accepted connections only when the
    listening socket was made with `IPPROTO_TCP` (not the default 0, which they inherit),
    and Linux copies `TCP_NODELAY` from the listening socket to them; either does. With it
    on, an answer written in two parts (uvicorn writes the head, then the body) waited for
    the client's delayed ACK: about 40 ms for each API call on a busy connection. The run
    gateway's listener on the worker's host is made here too (standard library only, so
    that this file also runs in a run's container). The socket is closed when it cannot
    be bound."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((address, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def main():
    grant, spec = sys.argv[1], sys.argv[2]
    listeners = []
    for item in filter(None, spec.split(",")):
        local, _, destination = item.partition("=")
        address, _, port = local.rpartition(":")
        listeners.append((listener(address, int(port)), destination))
    if os.fork():
        return 0
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    asyncio.run(_serve(grant, listeners))
    return 0


if __name__ == "__main__":
    sys.exit(main())
