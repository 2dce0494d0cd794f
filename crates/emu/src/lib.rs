//! Software x86-64 CPU engine.
