"""The phantoms wing: two generators, their tissues and painting kit, the tumor library, the writer."""
