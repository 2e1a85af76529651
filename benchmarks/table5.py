"""The seed's Table 5 on the offline default: the looser bound (eq. 3, `--looser`) against the
stratified one (eq. 5, `--no-looser`), each trained with the DReG gradients `mixture` (the
library's default, unbiased), `eq8` and `released`, 3 seeds each (18 runs), at the offline
default's recipe (K = 10, batch 64) and half its budget (5 epochs: both modalities learnt) on a CPU; prints cross coherence
both ways, joint coherence, latent accuracy and the test log-likelihood, mean ± std over seeds.

    python benchmarks/table5.py                      # 18 runs, 2 at a time (about 3 CPU-minutes each)
    python benchmarks/table5.py --epochs 10 --jobs 8 --device cuda   # a longer budget on a GPU

It is benchmarks/estimator_study.py with these defaults (any of its options may be given and
override them); runs already evaluated are reused. Writes benchmarks/out/table5/study.md.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import estimator_study  # noqa: E402

DEFAULTS = ["--only", "mixture", "eq8", "released", "--seeds", "1", "2", "3", "--K", "10", "--epochs", "5", "--jobs", "2",
            "--ll-K", "1000", "--ll-n", "500", "--out", os.path.join(HERE, "out", "table5"),
            "--title", "Table 5 (looser eq. 3 vs stratified eq. 5)"]


def main(argv=None):
    estimator_study.main(DEFAULTS + list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
