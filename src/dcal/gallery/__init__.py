"""Re-identification galleries at scale: feature shards (``dcal embed --output FOLDER``) and a gallery index on
disk (``dcal index``) over faiss or Milvus, searched with the re-id protocol's exclusions and the user's filters.

* :mod:`dcal.gallery.shards` – resumable, torchrun-parallel embedding into fp16/fp32 shard sets.
* :mod:`dcal.gallery.index` – the index folder (manifest, id map, atomic generations, lock), build / add /
  remove, exact filtered search.
* :mod:`dcal.gallery.backends` – the vector backends behind one interface (faiss, Milvus).

faiss and pymilvus are optional extras (``dcal[search]``, ``dcal[milvus]``), imported only when used.
"""

from dcal.gallery.index import GalleryIndex, add_to_index, build_index, open_source, remove_from_index
from dcal.gallery.shards import ShardSet, embed_shards, finish_shards, is_shard_set, plan_shards, start_shards

__all__ = ["GalleryIndex", "ShardSet", "add_to_index", "build_index", "embed_shards", "finish_shards",
           "is_shard_set", "open_source", "plan_shards", "remove_from_index", "start_shards"]
