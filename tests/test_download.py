"""ClimbMix shard download against a real HTTP server on 127.0.0.1 (http.server in a thread)."""
from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trainer import corpus
from trainer import download as dl

FAST = dl.FetchPolicy(retries=2, backoff=0.01, timeout=10)


def make_parquet(texts: list[str]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": texts, "id": list(range(len(texts)))}), buf,
                   compression="none")
    return buf.getvalue()


@pytest.fixture(scope="module")
def shard_bytes() -> dict[str, bytes]:
    """Shards 0..2 plus the pinned validation shard, ~100-200 KB each, from the sample text."""
    docs = corpus.sample_documents()
    out = {}
    for k, i in enumerate([0, 1, 2, dl.VAL_SHARD]):
        out[dl.shard_name(i)] = make_parquet(docs[k * 40:(k + 1) * 40])
    return out


class Server:
    """A loopback file server with switchable faults; records (path, Range) of each GET."""

    def __init__(self, files: dict[str, bytes]):
        self.files = dict(files)
        self.fail_500: set[str] = set()      # always answer 500
        self.drop_once: set[str] = set()     # first GET: send half the body, then hang up
        self.no_range = False                # ignore Range headers (answer 200 + whole file)
        self.requests: list[tuple[str, str | None]] = []
        self.dropped_at: dict[str, int] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                rng = self.headers.get("Range")
                server.requests.append((name, rng))
                if name in server.fail_500:
                    self.send_error(500, "Internal Server Error")
                    return
                body = server.files.get(name)
                if body is None:
                    self.send_error(404, "Not Found")
                    return
                start = 0
                if rng and not server.no_range:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                part = body[start:]
                self.send_header("Content-Length", str(len(part)))
                self.end_headers()
                if name in server.drop_once:
                    server.drop_once.discard(name)
                    half = len(part) // 2
                    server.dropped_at[name] = start + half
                    self.wfile.write(part[:half])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(part)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/data"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def gets(self, name: str) -> list[str | None]:
        return [r for n, r in self.requests if n == name]

    def close(self):
        if self.thread.is_alive():
            self.httpd.shutdown()
            self.httpd.server_close()


@pytest.fixture
def server(shard_bytes):
    s = Server(shard_bytes)
    yield s
    s.close()


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_full_download(tmp_path, server, shard_bytes):
    out = io.StringIO()
    train, val = dl.download_climbmix(tmp_path, 3, server.url, workers=3, policy=FAST,
                                      stream=out, tty=False)
    assert [p.name for p in train] == ["shard_00000.parquet", "shard_00001.parquet",
                                       "shard_00002.parquet"]
    assert val.name == "shard_06542.parquet"
    for p in [*train, val]:
        assert p.read_bytes() == shard_bytes[p.name]
    assert not list(tmp_path.glob("*.part"))
    lines = out.getvalue().splitlines()
    assert len([ln for ln in lines if ln.startswith("downloaded shard_")]) == 4
    assert "\r" not in out.getvalue()  # not a TTY: plain lines only

    # Everything present: nothing is fetched again.
    n = len(server.requests)
    out2 = io.StringIO()
    dl.download_climbmix(tmp_path, 3, server.url, policy=FAST, stream=out2, tty=False)
    assert len(server.requests) == n
    assert "4 of 4 files already downloaded" in out2.getvalue()


def test_server_error_gives_up_cleanly(tmp_path, server):
    server.fail_500.add("shard_00001.parquet")
    with pytest.raises(dl.DownloadError) as e:
        dl.download_climbmix(tmp_path, 3, server.url, workers=1, policy=FAST,
                             stream=io.StringIO(), tty=False)
    msg = str(e.value)
    assert "shard_00001.parquet" in msg and "HTTP 500" in msg and "3 attempts" in msg
    assert "\n" not in msg
    assert len(server.gets("shard_00001.parquet")) == 3  # first try + 2 retries
    assert not (tmp_path / "shard_00001.parquet").exists()


def test_missing_file_is_not_retried(tmp_path, server):
    del server.files["shard_00002.parquet"]
    with pytest.raises(dl.DownloadError, match="HTTP 404"):
        dl.download_climbmix(tmp_path, 3, server.url, workers=1, policy=FAST,
                             stream=io.StringIO(), tty=False)
    assert len(server.gets("shard_00002.parquet")) == 1
    assert not (tmp_path / "shard_00002.parquet").exists()


def test_connection_refused_says_no_network(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/data"
    with pytest.raises(dl.DownloadError) as e:
        dl.download_climbmix(tmp_path, 2, url, policy=FAST, stream=io.StringIO(), tty=False)
    msg = str(e.value)
    assert msg.startswith("cannot reach 127.0.0.1:")
    assert "(no network?); use --sample or --corpus PATH" in msg
    assert not list(tmp_path.glob("*.parquet"))


def test_not_parquet_is_rejected(tmp_path, server):
    server.files["shard_00000.parquet"] = b"<html>rate limited</html>" * 10
    with pytest.raises(dl.DownloadError, match="not parquet"):
        dl.download_climbmix(tmp_path, 1, server.url, workers=1, policy=FAST,
                             stream=io.StringIO(), tty=False)
    assert not (tmp_path / "shard_00000.parquet").exists()


def test_dropped_connection_resumes_with_range(tmp_path, server, shard_bytes):
    name = "shard_00000.parquet"
    server.drop_once.add(name)
    out = io.StringIO()
    dl.download_climbmix(tmp_path, 1, server.url, workers=1, policy=FAST, stream=out, tty=False)
    assert (tmp_path / name).read_bytes() == shard_bytes[name]
    gets = server.gets(name)
    assert gets[0] is None
    assert gets[1] == f"bytes={server.dropped_at[name]}-" and server.dropped_at[name] > 0
    assert len(gets) == 2
    assert f"downloaded {name} (resumed)" in out.getvalue()
    assert not (tmp_path / (name + ".part")).exists()


def test_leftover_part_file_is_resumed(tmp_path, server, shard_bytes):
    name = "shard_00000.parquet"
    body = shard_bytes[name]
    (tmp_path / (name + ".part")).write_bytes(body[:1000])
    dl.fetch(f"{server.url}/{name}", tmp_path / name, FAST, validate=dl.parquet_problem)
    assert (tmp_path / name).read_bytes() == body
    assert server.gets(name) == ["bytes=1000-"]


def test_complete_part_file_is_kept(tmp_path, server, shard_bytes):
    # A crash between finishing the .part and renaming it: the server answers 416.
    name = "shard_00000.parquet"
    (tmp_path / (name + ".part")).write_bytes(shard_bytes[name])
    dl.fetch(f"{server.url}/{name}", tmp_path / name, FAST, validate=dl.parquet_problem)
    assert (tmp_path / name).read_bytes() == shard_bytes[name]


def test_server_without_range_support_restarts(tmp_path, server, shard_bytes):
    name = "shard_00000.parquet"
    server.no_range = True
    (tmp_path / (name + ".part")).write_bytes(b"garbage that must not survive")
    dl.fetch(f"{server.url}/{name}", tmp_path / name, FAST, validate=dl.parquet_problem)
    assert (tmp_path / name).read_bytes() == shard_bytes[name]


def test_tty_progress_bar_redraws():
    out = io.StringIO()
    p = dl.Progress(2, stream=out, tty=True)
    p.start(2_000_000, 0)
    p.add(1_000_000)
    p.file_done("x", 1_000_000, 0.1, False)
    p.close()
    text = out.getvalue()
    assert text.startswith("\r[") and "1/2 files" in text and text.endswith("\n")


def test_shard_count_bounds():
    assert dl.climbmix_shards(2) == ([0, 1], 6542)
    with pytest.raises(ValueError):
        dl.climbmix_shards(0)
    with pytest.raises(ValueError):
        dl.climbmix_shards(6543)


def test_cli_without_network_fails_with_one_line(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/data"
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.prepare", "--cache-dir", str(tmp_path), "--base-url", url,
         "--num-shards", "1", "--retries", "0"],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("autoresearch-prepare: error: cannot reach 127.0.0.1:")
    assert "use --sample or --corpus PATH" in last
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    assert not (tmp_path / "datasets" / "climbmix").exists()


@pytest.mark.slow
def test_climbmix_end_to_end_then_noop_offline(tmp_path, server, shard_bytes):
    """Download over loopback, prepare, then re-prepare with the raw shards gone: a no-op."""
    cmd = [sys.executable, "-m", "trainer.prepare", "--cache-dir", str(tmp_path), "--base-url",
           server.url, "--num-shards", "3", "--vocab-size", "300", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["name"] == "climbmix" and summary["status"] == "prepared"
    assert summary["val_docs"] == 40  # every row of the pinned validation shard
    assert summary["train_docs"] == 120
    assert (tmp_path / "datasets" / "CURRENT").read_text().strip() == "climbmix"

    for p in (tmp_path / "raw" / "climbmix").glob("*.parquet"):
        p.unlink()
    server.close()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    again = json.loads(proc.stdout)
    assert again["status"] == "unchanged"
    assert again["dataset_hash"] == summary["dataset_hash"]
