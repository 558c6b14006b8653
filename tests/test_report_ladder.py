"""The run report opens notebook 04's section with the component ladder: its figure, then its
table, before the key figures and the detailed tables."""
import json

import matplotlib.pyplot as plt
import pandas as pd

from dfd_lib.core import runs
from dfd_lib.pipeline.report import write_report


def _figure(path):
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [0, 1])
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def test_the_ladder_figure_comes_first_in_the_04_section(tmp_path):
    run = runs.open_run(tmp_path / "run")
    for name in ("04_experts_roc", "04_ladder", "04_roc_curves", "03_augmentation_grid"):
        _figure(run.figure(name))
    run.save_table(pd.DataFrame({"model": ["a"], "test_auc": [0.6]}).set_index("model"), "04_headline")
    run.save_table(pd.DataFrame({"rung": [1, 2], "model": ["baseline", "+ enrichment"], "test_auc": [0.6, 0.7]}).set_index("rung"),
                   "04_ladder")
    run.record_metrics("04_train_moe", {"mixture_test_auc": 0.7})
    (run.root / runs.TIMINGS).write_text(json.dumps({"04_train_moe": {"seconds": 1.0, "status": "ok"}}))
    page = write_report(run.root, render_notebooks=False).read_text()
    section = page[page.index('id="step-04"'):]
    order = [section.index(marker) for marker in ('src="figures/04_ladder.png"', "tables/04_ladder.csv", "mixture_test_auc",
                                                  "tables/04_headline.csv", 'src="figures/04_experts_roc.png"',
                                                  'src="figures/04_roc_curves.png"')]
    assert order == sorted(order)
    assert section.count("04_ladder.png") == 1 and section.count("tables/04_ladder.csv") == 1  # shown once
    assert page.index('id="step-03"') < page.index('id="step-04"')
