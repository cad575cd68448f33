"""Write recipes/cifar100-zoo/<method>-<teacher>-<student>.toml: the RepDistiller / mdistiller
CIFAR-100 pairs with FitNet, AT, SP, PKT, RKD, CRD (feature losses), DKD and DIST (divergences).

The plain-KD recipes (kd-*.toml) and README.md of that folder are written by hand; this script
writes the other 40 files, and tests/test_cifar100_zoo.py checks that the shipped ones are what it
writes. After editing it:

    python tools/cifar100_zoo.py
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "recipes" / "cifar100-zoo"

#: the methods, in the README table's order after KD
METHODS = ("fitnet", "at", "sp", "pkt", "rkd", "crd", "dkd", "dist")

LABELS = {"kd": "KD", "fitnet": "FitNet", "at": "AT", "sp": "SP", "pkt": "PKT", "rkd": "RKD",
          "crd": "CRD", "dkd": "DKD", "dist": "DIST"}

PAPERS = {
    "fitnet": 'Romero et al., "FitNets: hints for thin deep nets", ICLR 2015',
    "at": 'Zagoruyko & Komodakis, "Paying more attention to attention: improving the performance '
          'of convolutional neural networks via attention transfer", ICLR 2017',
    "sp": 'Tung & Mori, "Similarity-preserving knowledge distillation", ICCV 2019',
    "pkt": 'Passalis & Tefas, "Learning deep representations with probabilistic knowledge '
           'transfer", ECCV 2018',
    "rkd": 'Park et al., "Relational knowledge distillation", CVPR 2019',
    "crd": 'Tian, Krishnan & Isola, "Contrastive representation distillation", ICLR 2020',
    "dkd": 'Zhao et al., "Decoupled knowledge distillation", CVPR 2022',
    "dist": 'Huang et al., "Knowledge distillation from a stronger teacher", NeurIPS 2022',
}

#: RepDistiller's -b for CIFAR-100 (scripts/run_cifar_distill.sh, README): every feature method's
#: weight, with -r 1 (the default) and -a 0
BETA = {"fitnet": 100.0, "at": 1000.0, "sp": 3000.0, "pkt": 30000.0, "rkd": 1.0, "crd": 0.8}

#: RepDistiller's distiller_zoo module and --distill name of each feature method
REFERENCE = {"fitnet": ("FitNet.py", "hint"), "at": ("AT.py", "attention"),
             "sp": ("SP.py", "similarity"), "pkt": ("PKT.py", "pkt"), "rkd": ("RKD.py", "rkd"),
             "crd": ("crd/criterion.py", "crd")}

#: the options each feature loss is given (RepDistiller's values, written out even where they are
#: kdreg's defaults)
OPTIONS: dict[str, dict[str, object]] = {
    "fitnet": {},
    "at": {"p": 2.0},
    "sp": {"pool": False},
    "pkt": {"pool": True},
    "rkd": {"distance": 25.0, "angle": 50.0, "pool": True},
    "crd": {"dim": 128, "negatives": 16384, "t": 0.07, "momentum": 0.5, "pool": True},
}

#: kdreg's split points that are RepDistiller's feat[...] of each method, per family
POINTS = {
    "resnet": {"fitnet": ["layer2"], "at": ["layer1", "layer2", "layer3"], "sp": ["layer3"],
               "last": ["layer3"]},
    "wrn": {"fitnet": ["layer2"], "at": ["layer1", "layer2", "layer3"], "sp": ["layer3"],
            "last": ["layer3"]},
    "vgg": {"fitnet": ["layer3"], "at": ["layer2", "layer3", "layer4", "layer5"],
            "sp": ["layer5"], "last": ["layer5"]},
}

#: RepDistiller's feat list of each family (models/resnet.py, wrn.py, vgg.py, forward with
#: is_feat=True, preact=False) against kdreg's split points
FEAT = {
    "resnet": "RepDistiller's ResNet returns feat = [stem, layer1, layer2, layer3, pooled layer3] "
              "(each stage's output after its last ReLU; models/resnet.py): kdreg's stem, layer1, "
              "layer2, layer3 are feat[0..3]",
    "wrn": "RepDistiller's WRN returns feat = [stem conv, block1, block2, block3, pooled "
           "ReLU(BN(block3))] (the stages' residual sums, before any BN-ReLU: the network is "
           "pre-activation; models/wrn.py): kdreg's stem, layer1, layer2, layer3 are feat[0..3]",
    "vgg": "RepDistiller's VGG returns feat = [group 1, ..., group 5, pooled group 5] (each conv "
           "group's output after its ReLU, before the pooling that follows it; models/vgg.py): "
           "kdreg's layer1..layer5 are feat[0..4]",
}


class Pair:
    """One teacher -> student pair and its published figures (CIFAR-100 test accuracy, %)."""

    def __init__(self, teacher: str, student: str, family: str, names: tuple[str, str],
                 params: tuple[str, str], figures: dict[str, str], dkd: tuple[str, float],
                 dist: tuple[str, str] | None):
        self.teacher, self.student, self.family = teacher, student, family
        self.names, self.params, self.figures = names, params, figures
        self.dkd_config, self.dkd_beta = dkd   # mdistiller's configs/cifar100/dkd/<config>.yaml
        self.dist = dist                       # DIST_KD's README: (mean, std), or none

    @property
    def key(self) -> str:
        return f"{self.teacher}-{self.student}"


def _figures(teacher: str, alone: str, kd: str, fitnet: str, at: str, sp: str, pkt: str, rkd: str,
             crd: str, dkd: str) -> dict[str, str]:
    return {"teacher": teacher, "alone": alone, "kd": kd, "fitnet": fitnet, "at": at, "sp": sp,
            "pkt": pkt, "rkd": rkd, "crd": crd, "dkd": dkd}


#: teacher, student alone, KD, FitNet, AT, SP, PKT, RKD, CRD: RepDistiller's README table 1 (the
#: CRD paper's Table 1); DKD: mdistiller's README; DIST: DIST_KD's README (mean and std)
PAIRS = (
    Pair("resnet56", "resnet20", "resnet", ("ResNet-56", "ResNet-20"), ("861,620", "278,324"),
         _figures("72.34", "69.06", "70.66", "69.21", "70.55", "69.67", "70.34", "69.61", "71.16",
                  "71.97"), ("res56_res20", 2.0), ("71.75", "0.30")),
    Pair("resnet110", "resnet32", "resnet", ("ResNet-110", "ResNet-32"), ("1,736,564", "472,756"),
         _figures("74.31", "71.14", "73.08", "71.06", "72.31", "72.69", "72.61", "71.82", "73.48",
                  "74.11"), ("res110_res32", 2.0), None),
    Pair("resnet32x4", "resnet8x4", "resnet", ("ResNet-32x4", "ResNet-8x4"),
         ("7,433,860", "1,233,540"),
         _figures("79.42", "72.50", "73.33", "73.50", "73.44", "72.94", "73.64", "71.90", "75.51",
                  "76.32"), ("res32x4_res8x4", 8.0), ("76.31", "0.19")),
    Pair("wrn40_2", "wrn16_2", "wrn", ("WRN-40-2", "WRN-16-2"), ("2,255,156", "703,284"),
         _figures("75.61", "73.26", "74.92", "73.58", "74.08", "73.83", "74.54", "73.35", "75.48",
                  "76.23"), ("wrn40_2_wrn_16_2", 6.0), None),
    Pair("vgg13", "vgg8", "vgg", ("VGG-13", "VGG-8"), ("9,462,180", "3,965,028"),
         _figures("74.64", "70.36", "72.98", "71.02", "71.43", "72.68", "72.88", "71.48", "73.94",
                  "74.68"), ("vgg13_vgg8", 6.0), None),
)

REPDISTILLER = ("HobbitLong/RepDistiller's README (\"Benchmark Results on CIFAR-100\", table 1), "
                "the benchmark of the CRD paper (Tian et al., ICLR 2020, Table 1)")
MDISTILLER = ("megvii-research/mdistiller's README (\"Decoupled Knowledge Distillation\", CIFAR-100 "
              "table, whose KD row repeats RepDistiller's)")
DIST_KD = "hunto/DIST_KD's README (CIFAR-100 table, mean and standard deviation of its runs)"
DIST_PAIRS = ("ResNet-56 -> ResNet-20, WRN-40-2 -> WRN-40-1, ResNet-32x4 -> ResNet-8x4 and three "
              "pairs of different architectures")

SETTING = ("RepDistiller's train_teacher.py and train_student.py defaults, the same for both "
           "stages{also}: 240 epochs, batch 64, SGD lr 0.05, momentum 0.9 (no Nesterov), weight "
           "decay 5e-4 on every parameter, lr x0.1 after epochs 150, 180 and 210.")

SGD_EQUIVALENCE = (
    "kdreg's rule (1 - lam) CE + lam D cannot weigh CE and the divergence 1 and 1: lam = 0.5 with "
    "{same} gives L' = 0.5 CE + 0.5 D = {half} = L / 2 (doubling {weights} instead would give "
    "0.5 CE + D, another loss). With PyTorch's "
    "SGD (weight decay w added to the gradient, then momentum, then a step of lr eta), the "
    "reference's gradient on L = 2 L' is 2 g + w theta = 2 (g + (w / 2) theta): its momentum "
    "buffer is twice the one accumulated from g + (w / 2) theta, and its step eta times that "
    "buffer is (2 eta) times the other. So the student stage trains with lr 0.1 (2 x 0.05) and "
    "weight decay 2.5e-4 (5e-4 / 2): exactly the reference's updates, at every lr of the schedule "
    "(the same x0.1 factors; the teacher stage keeps lr 0.05, weight decay 5e-4).")

COMMON_TAIL = (
    "Augmentation: the reference pads 4 pixels with zeros (RandomCrop(32, padding=4)) and flips; "
    "kdreg pads 4 pixels by reflection, then crops and flips.",
    "Selection: the reference trains on all 50,000 training images and reports the best test "
    "accuracy of the 240 epochs; kdreg trains on all 50,000 too (val_split = 0) and reports the "
    "last epoch's.",
    "A teacher trained before (a kdreg checkpoint or state_dict file): add --set "
    "stages.teacher.init=PATH --set stages.teacher.epochs=0 (README.md in this folder).",
)


def _wrap(paragraph: str) -> list[str]:
    return textwrap.wrap(paragraph, width=100, initial_indent="# ", subsequent_indent="# ",
                         break_long_words=False, break_on_hyphens=False)


def _points(points: list[str]) -> str:
    return ", ".join(points)


def _num(x: float) -> str:
    return repr(float(x))


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


def figures_paragraph(pair: Pair, method: str) -> str:
    t, s = pair.names
    f = pair.figures
    head = (f"Published CIFAR-100 test accuracies (%): teacher {t} {f['teacher']}; {s} trained "
            f"alone {f['alone']}; KD {f['kd']}")
    if method in BETA:
        return f"{head}; {LABELS[method]} {f[method]}. Source: {REPDISTILLER}."
    base = f"{head}. Source: {REPDISTILLER}."
    if method == "dkd":
        return f"{base} DKD {f['dkd']}. Source: {MDISTILLER}, the code of the DKD paper."
    if pair.dist is not None:
        mean, std = pair.dist
        return f"{base} DIST {mean} (+-{std}). Source: {DIST_KD}, the code of the DIST paper."
    return (f"{base} No published DIST figure for this pair: the CIFAR-100 table of "
            f"hunto/DIST_KD's README, the code of the DIST paper, covers {DIST_PAIRS}.")


def stages_paragraph(pair: Pair, method: str) -> str:
    t, s = pair.names
    pt, ps = pair.params
    extra = {"fitnet": "; the hint regressor trains with it",
             "crd": "; the two embeddings train with it"}.get(method, "")
    return (f"Stages: teacher ({t} on labels, as RepDistiller's train_teacher.py trains it; {pt} "
            f"params), student ({s}, {LABELS[method]} from teacher; {ps} params{extra}). kdreg's "
            f"{pair.teacher} and {pair.student} are RepDistiller's networks of those names layer "
            f"for layer, with its parameter counts (100 classes).")


def setting_paragraph(method: str, pair: Pair) -> str:
    if method in BETA:
        return SETTING.format(also="")
    if method == "dkd":
        also = (f" (mdistiller's configs/cifar100/dkd/{pair.dkd_config}.yaml has the same SOLVER; "
                f"the student stage's lr and weight decay below are its equivalent)")
    else:
        also = (" (DIST_KD's CIFAR-100 config, hunto/image_classification_sota's "
                "configs/strategies/distill/dist_cifar.yaml, is the same: lr 0.05 held through a "
                "120-epoch warm-up at that lr, then x0.1 every 30 epochs, weight decay on every "
                "parameter; the student stage's lr and weight decay below are its equivalent)")
    return SETTING.format(also=also)


def loss_paragraphs(method: str, pair: Pair) -> list[str]:
    label = LABELS[method]
    if method in BETA:
        beta = BETA[method]
        b = f"{beta:g}"
        module, flag = REFERENCE[method]
        return [
            f"{label} as in RepDistiller's command (--distill {flag} -r 1 -a 0 -b {b}: "
            f"scripts/run_cifar_distill.sh, -r at its default 1): its loss gamma CE + alpha KD + "
            f"beta F (helper/loops.py) is CE + {b} {label} (distiller_zoo/{module}), which is "
            f"kdreg's (1 - lam) CE + lam KD + weight {label} with lam = 0 and weight = {b} "
            f"exactly: the feature term lies outside the lam mix and CE keeps weight 1, so nothing "
            f"is rescaled.",
            points_paragraph(method, pair),
            DETAILS[method](pair),
        ]
    if method == "dkd":
        beta = pair.dkd_beta
        where = (f"BETA {beta:g} in configs/cifar100/dkd/{pair.dkd_config}.yaml" if beta != 8.0 else
                 f"configs/cifar100/dkd/{pair.dkd_config}.yaml keeps the default BETA 8.0")
        return [
            f"DKD as mdistiller trains it ({where}; CFG.DKD's CE_WEIGHT 1.0, ALPHA 1.0, T 4, "
            f"WARMUP 20): L = CE + min(epoch / 20, 1) (1.0 TCKD + {beta:g} NCKD), both KL "
            f"divergences times T^2 and averaged over the batch, epochs counted from 1 "
            f"(mdistiller/distillers/DKD.py); kdreg's dkd divergence is the same with the same "
            f"warm-up (epoch 1 gives 1/20).",
            SGD_EQUIVALENCE.format(
                same=f"DKD's own weights (alpha = 1, beta = {beta:g})", weights="alpha and beta",
                half="0.5 (CE + min(epoch / 20, 1) (TCKD + "
                     f"{beta:g} NCKD))"),
        ]
    return [
        "DIST as DIST_KD trains CIFAR-100 (dist_cifar.yaml: kd dist_t4, ori_loss_weight 1, "
        "kd_loss_weight 2; DIST's beta = gamma = 1 and tau = 4 in lib/models/losses/kd_loss.py): "
        "L = CE + 2 tau^2 (inter + intra), i.e. beta = gamma = 2 with CE weight 1, where inter = 1 "
        "- the mean Pearson correlation of each sample's class probabilities and intra = 1 - the "
        "mean correlation of each class's probabilities over the batch (of 64 in both).",
        SGD_EQUIVALENCE.format(same="DIST's own weights (beta = gamma = 2, tau = 4)",
                               weights="beta and gamma",
                               half="0.5 (CE + 2 tau^2 (inter + intra))"),
    ]


def points_paragraph(method: str, pair: Pair) -> str:
    fam = pair.family
    if method == "fitnet":
        p = POINTS[fam]["fitnet"]
        what = ("the third conv group's output" if fam == "vgg" else "the second stage's output")
        return (f"Points: {_points(p)}, {what}: RepDistiller's hint_layer = 2, feat[2]. {FEAT[fam]}.")
    if method == "at":
        p = POINTS[fam]["at"]
        what = "every conv group's output but the first" if fam == "vgg" else "every stage's output"
        return (f"Points: {_points(p)}, {what}: RepDistiller's feat[1:-1]. {FEAT[fam]}.")
    if method == "sp":
        p = POINTS[fam]["sp"]
        what = "the last conv group's output" if fam == "vgg" else "the last stage's output"
        return (f"Points: {_points(p)}, {what}, flattened (pool = false): RepDistiller's "
                f"feat[-2]. {FEAT[fam]}.")
    p = POINTS[fam]["last"]
    text = (f"Points: {_points(p)} with pool = true, kdreg's last split point averaged over its "
            f"positions: RepDistiller's feat[-1], the pooled last stage. {FEAT[fam]}.")
    if fam == "wrn":
        text += (" The one difference here: RepDistiller pools after the head's final BN-ReLU, and "
                 "kdreg's wrn has no split point after it, so the pooled layer3 is the "
                 "pre-activation feature (the BN-ReLU's input), not RepDistiller's feat[-1].")
    return text


def _fitnet_details(pair: Pair) -> str:
    return ("The regressor is RepDistiller's ConvReg: both maps have the same size here, so a "
            "1x1 convolution from the student's channels to the teacher's, BatchNorm and ReLU, "
            "trained with the student in its optimizer (RepDistiller's trainable_list); MSE "
            "against the teacher's map. The hint is trained jointly with CE from the first epoch, "
            "as RepDistiller does (the paper's separate hint-training stage is not reproduced).")


def _at_details(pair: Pair) -> str:
    return ("p = 2: each map becomes normalise(mean_c f_c^2), and the loss is the mean over "
            "batch and positions of the squared differences, summed over the points; teacher and "
            "student maps have the same sizes at every point.")


def _sp_details(pair: Pair) -> str:
    return ("The batch's similarity matrix G = f f^T of the flattened maps, rows L2-normalised, "
            "and ||G_s - G_t||_F^2 / B^2.")


def _pkt_details(pair: Pair) -> str:
    return ("Cosine-kernel conditional probabilities between the batch's features, their KL "
            "divergence averaged over the B^2 entries, eps 1e-7.")


def _rkd_details(pair: Pair) -> str:
    return ("distance = 25, angle = 50 (RepDistiller's w_d and w_a): 25 times the smooth-L1 loss "
            "of the normalised pairwise distances plus 50 times that of the triplets' angles.")


def _crd_details(pair: Pair) -> str:
    return ("RepDistiller's options under kdreg's names: feat_dim 128 is dim = 128, nce_k 16384 "
            "is negatives = 16384, nce_t 0.07 is t = 0.07, nce_m 0.5 is momentum = 0.5; mode "
            "exact: the negatives are drawn among the other classes' samples (kdreg draws them with "
            "replacement, RepDistiller without). Memory banks of 50,000 x 128 per side, saved and "
            "resumed with the student; each sample's index comes from kdreg's loader.")


DETAILS = {"fitnet": _fitnet_details, "at": _at_details, "sp": _sp_details, "pkt": _pkt_details,
           "rkd": _rkd_details, "crd": _crd_details}


def filename(method: str, pair: Pair) -> str:
    return f"{method}-{pair.key}.toml"


def student_keys(method: str, pair: Pair) -> list[str]:
    if method in BETA:
        points = POINTS[pair.family]["last" if method in ("pkt", "rkd", "crd") else method]
        entry = {"name": method, "points": points, "weight": BETA[method], **OPTIONS[method]}
        body = ", ".join(f"{k} = {_toml(v)}" for k, v in entry.items())
        return ["lam = 0.0", f"feature_losses = [{{ {body} }}]"]
    if method == "dkd":
        div = (f'{{ name = "dkd", alpha = 1.0, beta = {_num(pair.dkd_beta)}, warmup = 20 }}')
    else:
        div = '{ name = "dist", beta = 2.0, gamma = 2.0 }'
    return ["lam = 0.5", "tau = 4.0", f"divergence = {div}",
            "optimizer = { lr = 0.1, weight_decay = 2.5e-4 }"]


def render(method: str, pair: Pair) -> str:
    t, s = pair.names
    name = filename(method, pair)
    paragraphs = [
        f"The RepDistiller / mdistiller CIFAR-100 benchmark, {LABELS[method]}: {t} -> {s}.",
        f"{LABELS[method]}: {PAPERS[method]}.",
        figures_paragraph(pair, method),
        stages_paragraph(pair, method),
        "Setting: " + setting_paragraph(method, pair),
        *loss_paragraphs(method, pair),
        *COMMON_TAIL,
        f"Run: kdreg run recipes/cifar100-zoo/{name}",
        "Smoke test of the whole pipeline: add --set train.epochs=1 (every stage inherits epochs).",
    ]
    lines = [line for p in paragraphs for line in _wrap(p)]
    lines += [
        f'name = "cifar100-zoo-{name[:-5]}"',
        "seed = 0",
        "",
        "[data]",
        'dataset = "cifar100"',
        'root = "~/.cache/kdreg/data"',
        "download = true",
        "batch_size = 64",
        "val_split = 0",
        "",
        "[train]",
        "epochs = 240",
        'optimizer = { name = "sgd", lr = 0.05, momentum = 0.9, weight_decay = 5e-4, nesterov = false }',
        'schedule = { name = "multistep", milestones = [150, 180, 210], gamma = 0.1 }',
        "",
        "[[stages]]",
        'name = "teacher"',
        f'backbone = {{ name = "{pair.teacher}" }}',
        'graph = { name = "none" }',
        "",
        "[[stages]]",
        'name = "student"',
        f'backbone = {{ name = "{pair.student}" }}',
        'graph = { name = "kd", teacher = "teacher" }',
        *student_keys(method, pair),
    ]
    return "\n".join(lines) + "\n"


def recipes() -> dict[str, str]:
    """``{file name: text}`` of every generated recipe."""
    return {filename(m, p): render(m, p) for p in PAIRS for m in METHODS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if a shipped file differs")
    args = parser.parse_args(argv)
    stale = [n for n, text in recipes().items()
             if not (ZOO / n).is_file() or (ZOO / n).read_text() != text]
    if args.check:
        for n in stale:
            print(f"differs: recipes/cifar100-zoo/{n}")
        return 1 if stale else 0
    for n in stale:
        (ZOO / n).write_text(recipes()[n])
        print(f"wrote recipes/cifar100-zoo/{n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
