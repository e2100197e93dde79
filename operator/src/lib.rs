//! The operator library (filled in by the operator issue).
