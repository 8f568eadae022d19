"""Model summary: parameters and MAdds per layer, and the CLI."""

from __future__ import annotations

import pytest

from ca_flax.models import create_model
from ca_flax.models.__main__ import main
from ca_flax.models.summary import summarize


@pytest.mark.parametrize(
    "name, paper_madds", [("mobilenetv2", 300.8e6), ("mobilenetv2_se", 303.1e6), ("mobilenetv2_cbam", 306.3e6),
                          ("mobilenetv2_ca", 310.5e6)],
)
def test_madds_at_224_within_3_percent_of_paper(name, paper_madds):
    summary = summarize(create_model(name))
    assert abs(summary.total_madds - paper_madds) / paper_madds < 0.03
    assert summary.total_params == sum(r.params for r in summary.rows)


def test_attention_costs_are_counted_and_ordered():
    base = summarize(create_model("mobilenetv2"))
    ca = summarize(create_model("mobilenetv2_ca"))
    se = summarize(create_model("mobilenetv2_se"))
    # CA's gates multiply every position twice; SE once: CA adds most.
    assert base.total_madds < se.total_madds < ca.total_madds
    assert [r.path for r in ca.rows[:3]] == ["stem", "blocks_0", "blocks_1"]
    assert ca.rows[-1].path == "classifier" and ca.rows[-1].madds == 1280 * 1000


def test_rows_at_depth_two_cover_the_same_totals():
    model = create_model("mobilenetv2_ca", width_mult=0.25, num_classes=10)
    shallow, deep = summarize(model, (1, 32, 32, 3)), summarize(model, (1, 32, 32, 3), depth=2)
    assert (shallow.total_params, shallow.total_madds) == (deep.total_params, deep.total_madds)
    rows = {r.path: r for r in deep.rows}
    assert rows["blocks_1/attention"].module == "CoordinateAttention"
    assert rows["blocks_1/attention"].output_shape == (1, 8, 8, 48)
    # Gate products: 2 per element of the 8x8x48 map, plus the three 1x1 convs.
    assert rows["blocks_1/attention"].madds == 2 * 8 * 8 * 48 + 16 * 48 * 8 + 8 * 8 * 48 * 2


def test_cli_summary_and_list(capsys):
    assert main(["summary", "mobilenetv2_ca", "--width", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "2,095,568" in out and "blocks_16" in out and "MAdds" in out
    assert main(["list"]) == 0
    assert "mobilenetv2_cbam" in capsys.readouterr().out


def test_cli_bad_input_exits_2(capsys):
    assert main(["summary", "resnet50"]) == 2
    err = capsys.readouterr().err
    assert "Unknown model 'resnet50'" in err and "mobilenetv2_ca" in err
    assert main(["summary", "mobilenetv2", "--width", "0"]) == 2
    assert "width_mult" in capsys.readouterr().err
