"""Teacher stores: a frozen teacher's outputs computed once over K augmented views of every
training image, replayed exactly by the students that read them.

- :mod:`kdreg.store.format`: the files (a JSON manifest, raw memory-mapped arrays), opening a store
  and checking it, and what a store depends on (:func:`teacher_depends`, :func:`data_depends`);
- :mod:`kdreg.store.replay`: a student stage's training batches from a store, each image at one of
  its stored views, with the teacher outputs read from the store (:class:`StoreLoader`,
  :class:`StoredOutputs`);
- :mod:`kdreg.store.streamed`: the streamed path's views: each one's RandomResizedCrop box and
  flip, drawn as the live transform draws them and rebuilt from them by the loader's workers;
- :mod:`kdreg.store.teach`: ``kdreg teach``, the writer (:func:`teach`).

docs/store.md describes the format, what invalidates a store and the top-k target.
"""

from kdreg.store.format import MANIFEST, TeacherStore, open_store

__all__ = ["MANIFEST", "TeacherStore", "open_store"]
