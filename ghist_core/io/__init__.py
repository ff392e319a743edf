"""Reading and writing files: slide backends behind one ``Slide``, atomic writes, checksums."""
