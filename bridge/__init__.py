"""Adapters: our attacks as ART / Foolbox / torchattacks attack classes, and a registry of all attacks.

Each library sits behind its own pip extra; importing an adapter whose library is missing raises an
ImportError that names the extra to install.
"""
