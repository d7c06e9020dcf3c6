"""The model room: families behind one seam (family.py, registered in families.py), built through transformers' own
classes (build.py); attention, GPU peaks, export and generation. Importing the package itself costs nothing."""
