"""Live AWS spot prices through real boto3 against EC2 on loopback (moto's server mode).

moto answers DescribeSpotPriceHistory with 0.00001 $/h for every offering it knows, which
makes the overlay easy to see: the plan's AWS spot offers must carry that live price."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from optjob.manager.pricing import spot_live

ROOT = Path(__file__).resolve().parents[3]
CATALOG = ROOT / "tests" / "data" / "skypilot-catalog" / "v8"


@pytest.fixture
def ec2(moto_endpoint: str) -> dict[str, str]:
    return {"AWS_ENDPOINT_URL": moto_endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "NO_PROXY": "127.0.0.1"}


def test_live_prices_from_ec2(ec2: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    for k, v in ec2.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    prices = spot_live.live_spot_prices(["p4d.24xlarge"], ["us-east-1"])
    assert prices, "moto knows p4d.24xlarge offerings in us-east-1"
    assert all(region == "us-east-1" and itype == "p4d.24xlarge" and price == pytest.approx(1e-5)
               for (region, _zone, itype), price in prices.items())


def test_plan_uses_live_spot_prices_when_credentials_exist(ec2: dict[str, str], tmp_path: Path):
    spec = tmp_path / "aws.yaml"
    spec.write_text("name: live\nmodel: {init: {}}\nsteps: [{train: {max_steps: 10}}]\n"
                    "resources: {cloud: aws, accelerators: 'A100:8', spot: true}\n"
                    "storage: {artifacts: 's3://bucket/live'}\n")
    env = {**os.environ, **ec2, "OPTJOB_HOME": str(tmp_path / "home"), "OPTJOB_CATALOG_DIR": str(CATALOG),
           "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")}

    def plan(**extra: str) -> dict:
        proc = subprocess.run([sys.executable, "-m", "optjob.manager.cli", "plan", str(spec), "--json"],
                              capture_output=True, text=True, env={**env, **extra}, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    live = plan()
    assert live["chosen"]["hourly_usd"] == pytest.approx(1e-5) and live["chosen"]["cloud"] == "aws"
    assert any("live EC2 spot prices" in n for n in live["notes"])
    catalog = plan(AWS_ACCESS_KEY_ID="", AWS_SECRET_ACCESS_KEY="")
    assert catalog["chosen"]["hourly_usd"] == pytest.approx(2.4655)  # the catalog's cheapest p4d spot
    assert any("no AWS credentials" in n for n in catalog["notes"])
