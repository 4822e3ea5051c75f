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


def main():
    grant, spec = sys.argv[1], sys.argv[2]
    listeners = []
    for item in filter(None, spec.split(",")):
        local, _, destination = item.partition("=")
        address, _, port = local.rpartition(":")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, int(port)))
        sock.listen(128)
        listeners.append((sock, destination))
    if os.fork():
        return 0
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    asyncio.run(_serve(grant, listeners))
    return 0


if __name__ == "__main__":
    sys.exit(main())
