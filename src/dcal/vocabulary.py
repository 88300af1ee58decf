"""The values dcal's options take, declared once: the config's choices, the model's arguments, the CLI's
``choices=``, the data readers and the report all read them from here (no torch: ``dcal.config`` validates with
these before anything heavy is imported)."""

from __future__ import annotations

# --------------------------------------------------------------------------------------------- tasks, data
TASKS = ("fgvc", "reid")
# the dataset names, and the task of each, are their registrations: dcal.data.registry.DATASETS
# torchvision's list; ``.tif`` / ``.tiff`` / ``.ppm`` / ``.pgm`` count everywhere (folder sets and commands alike)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
AIRCRAFT_LEVELS = ("variant", "family", "manufacturer")  # FGVC-Aircraft's annotation levels: 100, 70, 30 classes
SYNTHETIC_TASKS = ("mark", "coarse")  # the generated set: classes differ in a small mark | shape x texture
ERASING_MODES = ("pixel", "mean")  # Re-ID random erasing fill: N(0, 1) noise (TransReID) | the mean colour
ON_BAD_IMAGE = ("skip", "error")

# -------------------------------------------------------------------------------------------------- model
BRANCHES = ("sa", "glca", "pwca")  # the three streams, in the order of their losses
QUERY_SELECTIONS = ("rollout", "random", "last_layer")  # GLCA's local queries (last_layer: the ablation)
PAIR_STRATEGIES = ("random", "intra", "inter", "mix", "noise")  # PWCA distractors (Table 4)
GLCA_POOLS = ("mean", "cls")  # the GLCA feature (docs/design.md, GLCA)
BACKBONE_POOLS = ("token", "avg", "map")  # the backbone poolings DCAL's rollout follows (docs/design.md, Backbones)
FUSIONS = ("sa+glca", "sa", "glca")  # the branches a prediction or an embedding combines
LORA_TARGETS = ("qkv", "proj", "fc1", "fc2")  # model.lora.targets: block linears (dcal.model.finetune.TARGET_LINEARS)
DEFAULT_TOP_R = {"fgvc": 0.1, "reid": 0.3}  # the paper's R
PRECISIONS = ("fp32", "bf16", "fp16")  # dcal.model.dcal.autocast
AMP_PRECISION = {"none": "fp32", "bf16": "bf16", "fp16": "fp16"}  # train.amp -> the autocast precision

# -------------------------------------------------------------------------------------- training, evaluation
LOSS_WEIGHTINGS = ("dynamic", "fixed")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("cosine", "step", "constant")
# train.sampler: auto (Re-ID: pk, FGVC: shuffle) | shuffle | pk (P classes or identities x K images per batch)
SAMPLERS = ("auto", "shuffle", "pk")
DEVICES = ("auto", "cpu", "cuda")  # train.device (the commands' --device also takes cuda:N, mps)
REID_FEATURES = ("before_bn", "after_bn")
RETRIEVAL_METRICS = ("euclidean", "cosine")  # eval.metric, dcal search --metric
# eval.rerank_method, dcal search --rerank: k-reciprocal re-ranking on the sparse neighbour graph | dense matrices
RERANK_METHODS = ("graph", "dense")
# dcal index build --type (any faiss index_factory string is taken too); auto: flat up to FLAT_MAX_VECTORS, else ivf
INDEX_KINDS = ("auto", "flat", "ivf", "ivf-pq", "ivf-sq8", "hnsw")
INDEX_BACKENDS = ("faiss", "milvus")  # dcal index build --backend
FEATURE_DTYPES = ("float16", "float32")  # dcal embed --dtype (feature shards)
# the scores an epoch record carries; the first one picks the best checkpoint
SCORE_KEYS = {"fgvc": ("top1", "top1_sa", "top1_glca"), "reid": ("mAP", "rank1", "mINP")}
BEST_METRIC = {task: keys[0] for task, keys in SCORE_KEYS.items()}
