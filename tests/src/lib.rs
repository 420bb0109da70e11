//! Test support for lb: see the tests/ folder.
