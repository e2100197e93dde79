//! Any bytes from the instructions topic: classification never panics, every rejection says
//! why, and whatever is accepted re-encodes to itself and maps to a resource or a clear error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qdb_proto::Message;
use qdb_proto::v1;
use qdb_provisioner::intake::{Verdict, classify};
use qdb_provisioner::mapping;

fuzz_target!(|data: &[u8]| {
    match classify(data, 64 * 1024, |c| c == "region-a" || c == "region-b") {
        Verdict::Journal(ins) => {
            let again = v1::Instruction::decode(ins.encode_to_vec().as_slice()).expect("re-encoded instruction decodes");
            assert_eq!(again, ins);
            if let Err(e) = mapping::desired(&ins, None) {
                assert!(!e.reason().is_empty() && !e.to_string().is_empty());
            }
        }
        Verdict::Reject { reason, message, .. } => {
            assert!(!reason.is_empty() && !message.is_empty(), "a rejection without a reason");
        }
    }
});
