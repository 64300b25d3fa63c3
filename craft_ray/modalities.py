"""The four medical modalities: descriptions, anatomy, label sets per dataset, prompt templates.

A *dataset* names a label set inside a modality: ``phantom`` is the procedurally generated
world of :mod:`craft_ray.data.phantom`; the others are real public datasets whose official
layouts :mod:`craft_ray.data.adapters` turns into manifests. Label names are snake_case
identifiers used in manifests, knowledge files and configs; display names go into prompts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from craft_ray.errors import one_of

# Distractor descriptions for the CAS modality dimension (DESIGN.md, "The Clinical Alignment Score").
DISTRACTORS: tuple[str, ...] = ("a natural photograph", "a blank image", "random noise", "a diagram")


@dataclass(frozen=True)
class Label:
    """One class of a dataset: identifier and the words used for it in prompts."""

    name: str  # snake_case identifier used in manifests, configs and knowledge files
    display: str  # human words inserted into prompt templates


@dataclass(frozen=True)
class Modality:
    """A medical imaging modality and the label sets of the datasets that belong to it."""

    name: str  # short identifier: cxr | derm | fundus | histo
    description: str  # what an image of this modality is, used as its CAS modality prompt
    anatomy: str  # body part / specimen shown
    grayscale: bool  # grayscale modalities replicate one channel into RGB
    caption: str  # modality-level caption (no pathology) used to pretrain the tiny base UNet
    templates: tuple[str, ...]  # label prompt templates; "{label}" is replaced by Label.display
    datasets: dict[str, tuple[Label, ...]] = field(default_factory=dict)  # dataset -> ordered labels

    def labels(self, dataset: str = "phantom") -> tuple[Label, ...]:
        """Ordered labels of ``dataset`` (the class index is the position in this tuple)."""
        if dataset not in self.datasets:
            raise one_of("dataset", dataset, sorted(self.datasets), f"for modality {self.name}")
        return self.datasets[dataset]

    def label_names(self, dataset: str = "phantom") -> list[str]:
        """Label identifiers of ``dataset`` in class-index order."""
        return [lab.name for lab in self.labels(dataset)]

    def label(self, name: str, dataset: str = "phantom") -> Label:
        """Look up one label by identifier, with an error that lists the known ones."""
        for lab in self.labels(dataset):
            if lab.name == name:
                return lab
        raise one_of("label", name, self.label_names(dataset), f"for modality {self.name} ({dataset})")

    def prompts(self, label: str, dataset: str = "phantom") -> list[str]:
        """The template prompts for ``label``: one per template."""
        display = self.label(label, dataset).display
        return [t.format(label=display) for t in self.templates]

    def prompt(self, label: str, dataset: str = "phantom") -> str:
        """The canonical (first-template) prompt for ``label``, used to condition generation."""
        return self.prompts(label, dataset)[0]


def _labels(*pairs: tuple[str, str]) -> tuple[Label, ...]:
    return tuple(Label(name, display) for name, display in pairs)


MODALITIES: dict[str, Modality] = {
    "cxr": Modality(
        name="cxr",
        description="a frontal chest x-ray radiograph",
        anatomy="chest",
        grayscale=True,
        caption="a chest x-ray",
        templates=(
            "a chest x-ray showing {label}",
            "a frontal chest radiograph with {label}",
            "a chest x-ray image of {label}",
        ),
        datasets={
            "phantom": _labels(
                ("no_finding", "no finding"),
                ("cardiomegaly", "cardiomegaly"),
                ("pleural_effusion", "pleural effusion"),
                ("nodule", "a lung nodule"),
            ),
            # CheXpert observations used as single-label classes (see data.adapters.chexpert).
            "chexpert": _labels(
                ("no_finding", "no finding"),
                ("cardiomegaly", "cardiomegaly"),
                ("pleural_effusion", "pleural effusion"),
                ("lung_lesion", "a lung lesion"),
                ("edema", "pulmonary edema"),
                ("consolidation", "consolidation"),
                ("atelectasis", "atelectasis"),
                ("pneumothorax", "pneumothorax"),
            ),
        },
    ),
    "derm": Modality(
        name="derm",
        description="a dermoscopy image of a skin lesion",
        anatomy="skin",
        grayscale=False,
        caption="a dermoscopy image",
        templates=(
            "a dermoscopy image of {label}",
            "a dermoscopic photograph showing {label}",
            "a close-up skin lesion image of {label}",
        ),
        datasets={
            "phantom": _labels(
                ("nevus", "a melanocytic nevus"),
                ("melanoma", "melanoma"),
                ("bcc", "basal cell carcinoma"),
            ),
            # HAM10000 `dx` codes / ISIC 2019 ground-truth columns.
            "ham10000": _labels(
                ("nevus", "a melanocytic nevus"),
                ("melanoma", "melanoma"),
                ("bcc", "basal cell carcinoma"),
                ("actinic_keratosis", "actinic keratosis"),
                ("benign_keratosis", "a benign keratosis"),
                ("dermatofibroma", "dermatofibroma"),
                ("vascular_lesion", "a vascular lesion"),
            ),
            "isic2019": _labels(
                ("nevus", "a melanocytic nevus"),
                ("melanoma", "melanoma"),
                ("bcc", "basal cell carcinoma"),
                ("actinic_keratosis", "actinic keratosis"),
                ("benign_keratosis", "a benign keratosis"),
                ("dermatofibroma", "dermatofibroma"),
                ("vascular_lesion", "a vascular lesion"),
                ("scc", "squamous cell carcinoma"),
            ),
        },
    ),
    "fundus": Modality(
        name="fundus",
        description="a color fundus photograph of the retina",
        anatomy="retina",
        grayscale=False,
        caption="a retinal fundus photograph",
        templates=(
            "a fundus photograph showing {label}",
            "a retinal fundus image with {label}",
            "a color fundus photo of {label}",
        ),
        datasets={
            "phantom": _labels(
                ("normal", "a normal retina"),
                ("diabetic_retinopathy", "diabetic retinopathy"),
                ("glaucoma", "glaucoma"),
            ),
            # ODIR-5K diagnostic keywords (N, D, G, C, A, H, M, O).
            "odir5k": _labels(
                ("normal", "a normal retina"),
                ("diabetic_retinopathy", "diabetic retinopathy"),
                ("glaucoma", "glaucoma"),
                ("cataract", "cataract"),
                ("amd", "age-related macular degeneration"),
                ("hypertension", "hypertensive retinopathy"),
                ("myopia", "pathological myopia"),
            ),
            # APTOS 2019 diagnosis grades 0-4.
            "aptos2019": _labels(
                ("normal", "a normal retina"),
                ("mild_dr", "mild diabetic retinopathy"),
                ("moderate_dr", "moderate diabetic retinopathy"),
                ("severe_dr", "severe diabetic retinopathy"),
                ("proliferative_dr", "proliferative diabetic retinopathy"),
            ),
        },
    ),
    "histo": Modality(
        name="histo",
        description="an H&E stained histopathology image of colorectal tissue",
        anatomy="colorectal tissue",
        grayscale=False,
        caption="an H&E histopathology image",
        templates=(
            "an H&E histopathology image of {label}",
            "a hematoxylin and eosin stained tissue patch showing {label}",
            "a histology slide of {label}",
        ),
        datasets={
            "phantom": _labels(
                ("normal", "normal colon mucosa"),
                ("tumor", "colorectal adenocarcinoma"),
                ("stroma", "cancer-associated stroma"),
            ),
            # NCT-CRC-HE-100K class folders (ADI BACK DEB LYM MUC MUS NORM STR TUM).
            "nct_crc_he": _labels(
                ("adipose", "adipose tissue"),
                ("background", "background"),
                ("debris", "debris and necrosis"),
                ("lymphocytes", "lymphocytes"),
                ("mucus", "mucus"),
                ("smooth_muscle", "smooth muscle"),
                ("normal", "normal colon mucosa"),
                ("stroma", "cancer-associated stroma"),
                ("tumor", "colorectal adenocarcinoma"),
            ),
        },
    ),
}

MODALITY_NAMES: tuple[str, ...] = tuple(MODALITIES)


def get_modality(name: str) -> Modality:
    """Look up a modality by identifier, with an error that lists the known ones."""
    if name not in MODALITIES:
        raise one_of("modality", name, MODALITY_NAMES)
    return MODALITIES[name]
