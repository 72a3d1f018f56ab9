"""The playground page: the elements the issue names, and its SSE parser run under node (when present)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from rapidlm.serve.app import STATIC_DIR

PAGE = (STATIC_DIR / "index.html").read_text(encoding="utf-8")


def script() -> str:
    return re.search(r"<script>(.*)</script>", PAGE, re.S).group(1)


def test_page_has_the_named_elements_and_no_outside_resources():
    for needle in ('id="input"', 'id="send"', 'id="messages"', '"assistant"', 'id="api-key"'):
        assert needle in PAGE
    assert not re.search(r"(src|href)=\"(https?:)?//", PAGE)  # no CDN


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_script_parses_and_sse_parser_handles_split_chunks(tmp_path):
    body = script()
    assert subprocess.run(["node", "--check", "-"], input=body, text=True, capture_output=True).returncode == 0
    parser = re.search(r"async function\* sseEvents\(body\) \{.*?\n\}\n", body, re.S).group(0)
    events = [{"choices": [{"delta": {"content": "héllo"}}]}, {"choices": [{"delta": {"content": " 😀\n\nx"}}]}]
    stream = "".join(f"data: {json.dumps(e, ensure_ascii=False)}\n\n" for e in events) + "data: [DONE]\n\n"
    raw = list(stream.encode())
    harness = (
        parser
        + f"""
const bytes = new Uint8Array({json.dumps(raw)});
const cuts = [1, 7, 30, 31, 32, 90, bytes.length];  // splits inside events and inside UTF-8 characters
let pos = 0;
const body = new ReadableStream({{ pull(c) {{
  const end = cuts.find((x) => x > pos) || bytes.length;
  if (pos >= bytes.length) {{ c.close(); return; }}
  c.enqueue(bytes.slice(pos, end)); pos = end;
}} }});
(async () => {{ const got = []; for await (const e of sseEvents(body)) got.push(e);
  console.log(JSON.stringify(got)); }})();
"""
    )
    out = subprocess.run(["node", "-"], input=harness, text=True, capture_output=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == events
