"""Hand-written zero-shot prompts per dataset (CoOp's CUSTOM_TEMPLATES), keyed by DATASET.NAME."""

DEFAULT_TEMPLATE = "a photo of a {}."

CUSTOM_TEMPLATES = {
    "OxfordPets": "a photo of a {}, a type of pet.",
    "OxfordFlowers": "a photo of a {}, a type of flower.",
    "FGVCAircraft": "a photo of a {}, a type of aircraft.",
    "DescribableTextures": "{} texture.",
    "EuroSAT": "a centered satellite photo of {}.",
    "StanfordCars": "a photo of a {}.",
    "Food101": "a photo of {}, a type of food.",
    "SUN397": "a photo of a {}.",
    "Caltech101": "a photo of a {}.",
    "UCF101": "a photo of a person doing {}.",
    "ImageNet": DEFAULT_TEMPLATE,
    "ImageNetSketch": DEFAULT_TEMPLATE,
    "ImageNetV2": DEFAULT_TEMPLATE,
    "ImageNetA": DEFAULT_TEMPLATE,
    "ImageNetR": DEFAULT_TEMPLATE,
}


def template_for(dataset_name: str, override: str = "") -> str:
    template = override or CUSTOM_TEMPLATES.get(dataset_name, DEFAULT_TEMPLATE)
    if "{}" not in template:
        raise ValueError(f"zero-shot template {template!r} has no '{{}}' for the class name")
    return template
