"""The notification center page as served: its Content-Security-Policy, no inline script,
its two files, the product's app URL escaped into it, and CORS only for configured origins."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.api_support import AUDIENCE, JWT_SECRET, api_settings, running_api

if TYPE_CHECKING:
    from tests.conftest import Backend

pytestmark = pytest.mark.integration


def test_the_page_its_policy_and_its_files(backend: Backend) -> None:
    settings = api_settings(backend.bootstrap, backend.database_url, app_url='https://app.example.com/"x')
    with running_api(settings) as base:
        page = httpx.get(f"{base}/", timeout=10)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "default-src 'none'" in csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert page.headers["x-content-type-options"] == "nosniff"
        # Every script is a file; no inline handlers (the policy would block them anyway).
        scripts = re.findall(r"<script\b[^>]*>", page.text)
        assert scripts and all('src="/static/' in s for s in scripts)
        assert not re.search(r"\son[a-z]+=", page.text)
        # The app URL is an attribute value, escaped: it cannot end the attribute.
        assert 'content="https://app.example.com/&quot;x"' in page.text

        js = httpx.get(f"{base}/static/center.js", timeout=10)
        assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
        assert "textContent" in js.text and "innerHTML" not in js.text
        css = httpx.get(f"{base}/static/center.css", timeout=10)
        assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
        for missing in ("center.html", "../app.py", "nope.js"):
            assert httpx.get(f"{base}/static/{missing}", timeout=10).status_code == 404

        # No CORS unless asked for.
        pre = httpx.options(
            f"{base}/v1/stream/token",
            headers={"Origin": "https://app.example.com", "Access-Control-Request-Method": "POST"},
            timeout=10,
        )
        assert "access-control-allow-origin" not in pre.headers


def test_cors_for_a_products_own_frontend(backend: Backend) -> None:
    api = {"jwt_secret": JWT_SECRET, "audience": AUDIENCE, "cors_origins": ["https://app.example.com"]}
    with running_api(api_settings(backend.bootstrap, backend.database_url, api=api)) as base:
        asked = {
            "Origin": "https://app.example.com",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization",
        }
        pre = httpx.options(f"{base}/v1/stream/token", headers=asked, timeout=10)
        assert pre.status_code == 200
        assert pre.headers["access-control-allow-origin"] == "https://app.example.com"
        other = httpx.options(
            f"{base}/v1/stream/token", headers={**asked, "Origin": "https://evil.example"}, timeout=10
        )
        assert other.headers.get("access-control-allow-origin") != "https://evil.example"
