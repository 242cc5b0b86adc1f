"""The paper's published figures (seed 003, Duncan et al., "Relative Robustness of Quantized
Neural Networks Against Adversarial Attacks"), copied as facts for side-by-side tables.

Table II: relative robustness |R_Q^FP| / |R|. Table III: adversarial transfer |R^0| / |R_NOT|
(its caption says "fool the FPNN, but are correctly classified by the QNN", but the counts
and the text are the share that still fools the QNN, R^0). Networks: MNIST 784-512-512-10,
CIFAR-10 3072-256-256-10, Keras, quantized by TFLite dynamic range (2020), full test sets.
"""

from __future__ import annotations

SOURCE = "seed 003 (Duncan et al.), Table II and Table III"

# (dataset, r, |delta|) -> (|R|, |R_Q^FP|, relative robustness %)
TABLE_II: dict[tuple[str, float, float], tuple[int, int, float]] = {
    ("mnist", 10, 1): (2323, 2312, 99.53),
    ("mnist", 20, 1): (648, 646, 99.69),
    ("mnist", 20, 1 / 4): (3282, 3239, 98.69),
    ("cifar", 20, 1): (1814, 1797, 99.06),
    ("cifar", 20, 3 / 4): (2039, 2020, 99.07),
    ("cifar", 20, 1 / 2): (2352, 2325, 98.85),
    ("cifar", 20, 1 / 4): (2775, 2737, 98.63),
}

# (dataset, r, |delta|) -> (|R_NOT|, |R^0|, adversarial transfer %)
TABLE_III: dict[tuple[str, float, float], tuple[int, int, float]] = {
    ("mnist", 10, 1 / 64): (116, 70, 60.34),
    ("mnist", 20, 1 / 64): (96, 76, 79.17),
    ("mnist", 10, 1 / 32): (228, 176, 77.19),
    ("mnist", 20, 1 / 32): (212, 146, 68.87),
    ("mnist", 10, 1 / 16): (446, 392, 87.89),
    ("mnist", 20, 1 / 16): (458, 392, 85.59),
    ("mnist", 10, 1 / 8): (975, 925, 94.87),
    ("mnist", 20, 1 / 8): (1154, 1077, 93.33),
    ("mnist", 10, 1 / 4): (1500, 1456, 97.07),
    ("mnist", 20, 1 / 4): (3548, 3448, 97.18),
    ("mnist", 10, 1 / 2): (3393, 3351, 98.76),
    ("mnist", 20, 1 / 2): (7157, 7064, 98.70),
    ("mnist", 10, 1): (8647, 8551, 98.89),
    ("mnist", 20, 1): (9888, 9756, 98.66),
    ("cifar", 10, 1 / 64): (219, 114, 52.05),
    ("cifar", 20, 1 / 64): (224, 118, 52.68),
    ("cifar", 10, 1 / 32): (340, 193, 56.76),
    ("cifar", 20, 1 / 32): (376, 208, 55.32),
    ("cifar", 10, 1 / 16): (469, 275, 58.64),
    ("cifar", 20, 1 / 16): (576, 340, 59.03),
    ("cifar", 10, 1 / 8): (627, 428, 68.26),
    ("cifar", 20, 1 / 8): (666, 447, 67.12),
    ("cifar", 10, 1 / 4): (962, 741, 77.03),
    ("cifar", 20, 1 / 4): (1286, 981, 76.28),
    ("cifar", 10, 1 / 2): (1157, 993, 85.82),
    ("cifar", 20, 1 / 2): (1723, 1477, 85.72),
    ("cifar", 10, 1): (1714, 1536, 89.61),
    ("cifar", 20, 1): (2255, 2017, 89.45),
}

# Section IV-A / Fig. 6 (MNIST, float network): the figure's bars are not printed as numbers;
# the text gives the extremes.
FIG6_TEXT = (
    "labels 1, 4 and 9 are most often attacked successfully, 0, 2 and 6 least; up to 63.87 "
    "percentage points between labels 1 and 6 at r = 10, delta = 0.5"
)
FIG6_MAX_GAP = {"r": 10, "step": 0.5, "labels": (1, 6), "gap": 63.87}
