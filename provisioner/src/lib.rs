//! The provisioner library (filled in by the provisioner issue).
