"""FID: streaming float64 feature statistics, a stable Fréchet distance, feature extractors."""

from .features import (
    ClassifierFeatures,
    FashionMNISTClassifier,
    FeatureExtractor,
    default_extractor_name,
    feature_stats,
    get_extractor,
    images_to_tensor,
    load_fmnist_extractor,
    reference_stats,
)
from .fid import (
    FeatureStats,
    compute_fid,
    frechet_distance,
    frechet_distance_scipy,
    load_mu_sigma,
)
from .inception import (
    INCEPTION_WEIGHTS_NAME,
    INCEPTION_WEIGHTS_URL,
    InceptionV3Features,
    find_inception_weights,
    load_inception_extractor,
)

__all__ = [
    # fid
    "FeatureStats",
    "compute_fid",
    "frechet_distance",
    "frechet_distance_scipy",
    "load_mu_sigma",
    # features
    "FeatureExtractor",
    "FashionMNISTClassifier",
    "ClassifierFeatures",
    "load_fmnist_extractor",
    "get_extractor",
    "default_extractor_name",
    "images_to_tensor",
    "feature_stats",
    "reference_stats",
    # inception
    "InceptionV3Features",
    "INCEPTION_WEIGHTS_NAME",
    "INCEPTION_WEIGHTS_URL",
    "find_inception_weights",
    "load_inception_extractor",
]
