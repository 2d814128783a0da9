"""scripts/load_serve.py: its report's arithmetic, and (slow) a real bounded run against a server it
starts on 127.0.0.1, in which every good request is served or refused with 429/503 and every bad one
gets a 4xx."""

import json
import random

import pytest
from script_loader import load_script


def test_summary_counts_statuses_and_flags_broken_promises():
    load = load_script("load_serve")
    results = ([{"kind": "good", "status": 200, "seconds": s} for s in (0.1, 0.2, 0.3, 0.4)]
               + [{"kind": "good", "status": 429, "seconds": 0.01}, {"kind": "good", "status": 500, "seconds": 1.0},
                  {"kind": "bad_json", "status": 400, "seconds": 0.01},
                  {"kind": "unknown_adapter", "status": 200, "seconds": 0.2}])
    report = load.summarize(results, [(0.0, 900.0), (1.0, 950.0), (2.0, 960.0), (3.0, 955.0)], True, 10)
    assert report["served"] == 4 and report["sent"] == 8 and report["planned"] == 10
    assert report["good_by_status"] == {"200": 4, "429": 1, "500": 1}
    assert report["good_rejected_wrongly"] == 1 and report["bad_not_4xx"] == 1
    assert report["latency_ms"]["p50"] == pytest.approx(300.0) and report["latency_ms"]["p99"] == pytest.approx(400.0)
    assert report["server_rss_mib"]["after_warmup"] == 950.0 and report["server_rss_mib"]["max"] == 960.0
    assert "| good requests served (200) | 4 |" in load.markdown(report)


def test_bad_requests_are_of_every_kind_and_good_ones_name_served_models():
    load = load_script("load_serve")
    args = load.parse_args(["--tiny", "2", "--bad-share", "0.5"])
    rng = random.Random(0)
    made = [load.make_request(rng, ["base", "adapter_0"], args) for _ in range(200)]
    assert {kind for kind, _ in made} == {"good", *load.BAD_KINDS}
    assert all(body["model"] in ("base", "adapter_0") for kind, body in made if kind == "good")


@pytest.mark.slow
def test_bounded_run_against_a_real_server(tmp_path):
    load = load_script("load_serve")
    out = tmp_path / "report.json"
    code = load.main(["--tiny", "3", "--clients", "24", "--requests", "60", "--duration", "120",
                      "--max-concurrent", "4", "--max-tokens", "12", "--json", str(out)])
    report = json.loads(out.read_text())
    assert code == 0 and report["server_alive"] and report["sent"] == 60
    assert report["served"] > 0 and report["good_rejected_wrongly"] == 0 and report["bad_not_4xx"] == 0
    assert set(report["good_by_status"]) <= {"200", "429", "503"}
