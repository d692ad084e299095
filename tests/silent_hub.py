"""A Hub that accepts every connection and never answers, for tests of the Hub client's timeouts."""

import socket
import threading


class SilentHub:
    """A Hub that accepts every connection and never answers, as a hung server or proxy does.

    `url` is its address (give it as HF_ENDPOINT or HfApi(endpoint=...)); `close()` it, or use it as
    a context manager.
    """

    def __init__(self):
        self.connections, self._closed = [], False
        self._socket = socket.create_server(("127.0.0.1", 0))
        self._socket.settimeout(0.2)  # so the accepting thread sees close() soon
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self._closed:
            try:
                connection, _ = self._socket.accept()
            except (socket.timeout, OSError):
                continue
            self.connections.append(connection)  # held open; nothing is read or written

    def close(self):
        self._closed = True
        self._socket.close()
        for connection in self.connections:
            connection.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
