"""``mmtune serve`` security: a non-loopback bind needs an API key, the key is required as a bearer token
and compared in constant time (hmac.compare_digest)."""

import httpx
import pytest
from serve_helpers import make_served_world

from mm.config import ConfigError
from train.cli import main
from train.serving.server import ServeOptions, ServerHandle, build_state, check_bind

KEY = "k" * 12 + "-secret-9f3a"


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "::", "example.org"])
def test_non_loopback_bind_without_a_key_is_refused(host):
    with pytest.raises(ConfigError, match="needs an API key"):
        check_bind(host, None)
    check_bind(host, KEY)
    check_bind("127.0.0.1", None)
    check_bind("::1", None)


def test_cli_refuses_the_bind_before_loading_anything(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("MMTUNE_API_KEY", raising=False)
    code = main(["serve", "--model", str(tmp_path / "no-such-model"), "--host", "0.0.0.0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("mmtune serve: --host 0.0.0.0: listening")


def test_short_keys_are_refused():
    with pytest.raises(ConfigError, match="16 characters"):
        check_bind("0.0.0.0", "short")


def test_the_key_is_required_and_compared_in_constant_time(tmp_path, monkeypatch):
    import train.serving.app as app

    compared = []
    real = app.hmac.compare_digest
    monkeypatch.setattr(app.hmac, "compare_digest", lambda a, b: compared.append((a, b)) or real(a, b))
    world = make_served_world(tmp_path, adapters=("alpha",))
    state = build_state(ServeOptions(model=str(world["model"]), adapters=[str(world["adapters"] / "alpha.safetensors")],
                                     api_key=KEY))
    handle = ServerHandle(state, "127.0.0.1", 0).start()
    try:
        url = handle.url + "/v1/models"
        assert httpx.get(url, timeout=10).status_code == 401
        wrong = httpx.get(url, headers={"Authorization": "Bearer " + "x" * len(KEY)}, timeout=10)
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        right = httpx.get(url, headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
        assert right.status_code == 200 and [m["id"] for m in right.json()["data"]][1:] == ["alpha"]
        assert (b"x" * len(KEY), KEY.encode()) in compared and (KEY.encode(), KEY.encode()) in compared
    finally:
        handle.stop()
