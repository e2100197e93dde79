//! Whether an object already has every field we would apply, so that a converged resource costs
//! no write at all (server-side apply of an unchanged object is still a PATCH request).

use serde_json::Value;

/// True when every field of `desired` is present in `actual` with the same value. Fields only in
/// `actual` (defaults, other managers, status) do not matter; lists must match element by element.
pub fn is_subset(desired: &Value, actual: &Value) -> bool {
    match (desired, actual) {
        (Value::Object(d), Value::Object(a)) => {
            d.iter().all(|(k, dv)| a.get(k).is_some_and(|av| is_subset(dv, av)) || dv.is_null())
        }
        (Value::Array(d), Value::Array(a)) => {
            d.len() == a.len() && d.iter().zip(a).all(|(x, y)| is_subset(x, y))
        }
        (d, a) => d == a,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn extra_fields_in_actual_are_fine() {
        let d = json!({"spec": {"replicas": 1, "template": {"image": "q:8"}}});
        let a =
            json!({"spec": {"replicas": 1, "template": {"image": "q:8", "pull": "Always"}}, "status": {}});
        assert!(is_subset(&d, &a));
    }

    #[test]
    fn a_changed_or_missing_field_is_drift() {
        let d = json!({"spec": {"replicas": 1, "template": {"image": "q:8"}}});
        assert!(!is_subset(&d, &json!({"spec": {"replicas": 1, "template": {"image": "q:7"}}})));
        assert!(!is_subset(&d, &json!({"spec": {"replicas": 1}})));
        assert!(!is_subset(&json!({"l": [1, 2]}), &json!({"l": [1]})));
        assert!(is_subset(&json!({"l": [{"a": 1}]}), &json!({"l": [{"a": 1, "b": 2}]})));
        assert!(is_subset(&json!({"x": null}), &json!({})));
    }
}
