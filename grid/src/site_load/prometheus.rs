//! Prometheus instant query as a load meter: `GET <base>/api/v1/query?query=…`.
//!
//! The query must yield one figure: a scalar, or a vector with exactly one
//! sample (aggregate several series with `sum(…)` in the query). The value
//! times [`PrometheusMeter::factor`] is the load in kW.

use serde_json::Value;

use super::{json_number, MeterError};

/// Where and what to query.
#[derive(Clone, Debug, PartialEq)]
pub struct PrometheusMeter {
    /// Server base URL, e.g. `http://127.0.0.1:9090`.
    pub base_url: String,
    /// PromQL expression, e.g. `sum(gpu_power_watts)`.
    pub query: String,
    /// Multiplies the value to give kW (W → kW: 0.001).
    pub factor: f64,
}

impl PrometheusMeter {
    /// The full query URL (query string percent-encoded).
    pub fn url(&self) -> Result<reqwest::Url, MeterError> {
        let base = self.base_url.trim_end_matches('/');
        let mut url = reqwest::Url::parse(&format!("{base}/api/v1/query"))
            .map_err(|e| MeterError::Config(format!("prometheus url {base:?}: {e}")))?;
        url.query_pairs_mut().append_pair("query", &self.query);
        Ok(url)
    }

    /// The load, kW, in a query response body (not range-checked).
    pub fn decode(&self, body: &[u8]) -> Result<f64, MeterError> {
        Ok(parse_response(body)? * self.factor)
    }
}

/// The single value of an instant-query response.
pub fn parse_response(body: &[u8]) -> Result<f64, MeterError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| MeterError::Format(format!("prometheus: bad json: {e}")))?;
    match v.get("status").and_then(Value::as_str) {
        Some("success") => {}
        Some(s) => {
            let err = v.get("error").and_then(Value::as_str).unwrap_or("");
            return Err(MeterError::Format(format!("prometheus: status {s}: {err}")));
        }
        None => return Err(MeterError::Format("prometheus: no status".into())),
    }
    let data = v
        .get("data")
        .ok_or_else(|| MeterError::Format("prometheus: no data".into()))?;
    let result = data.get("result");
    match data.get("resultType").and_then(Value::as_str) {
        Some("scalar") => sample_value(result),
        Some("vector") => {
            let series = result.and_then(Value::as_array).ok_or_else(|| {
                MeterError::Format("prometheus: vector result not an array".into())
            })?;
            match series.as_slice() {
                [one] => sample_value(one.get("value")),
                [] => Err(MeterError::Format(
                    "prometheus: empty result (series missing?)".into(),
                )),
                many => Err(MeterError::Format(format!(
                    "prometheus: {} series; aggregate them in the query (sum)",
                    many.len()
                ))),
            }
        }
        Some(t) => Err(MeterError::Format(format!(
            "prometheus: result type {t} (want vector or scalar)"
        ))),
        None => Err(MeterError::Format("prometheus: no resultType".into())),
    }
}

/// `[<unix time>, "<value>"]` → value.
fn sample_value(v: Option<&Value>) -> Result<f64, MeterError> {
    match v.and_then(Value::as_array).map(Vec::as_slice) {
        Some([_, value]) => json_number(value),
        _ => Err(MeterError::Format(
            "prometheus: sample is not [time, value]".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meter() -> PrometheusMeter {
        PrometheusMeter {
            base_url: "http://127.0.0.1:9090/".into(),
            query: "sum(gpu_power_watts{site=\"a b\"})".into(),
            factor: 0.001,
        }
    }

    #[test]
    fn url_encodes_the_query() {
        let u = meter().url().unwrap();
        assert_eq!(u.path(), "/api/v1/query");
        let q: Vec<(String, String)> = u.query_pairs().into_owned().collect();
        assert_eq!(q, [("query".into(), meter().query)]);
        assert!(!u.as_str().contains(' '));
        let bad = PrometheusMeter {
            base_url: "not a url".into(),
            ..meter()
        };
        assert!(matches!(bad.url(), Err(MeterError::Config(_))));
    }

    #[test]
    fn vector_and_scalar_results() {
        let vector = br#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"site":"a"},"value":[1700000000.123,"452000.5"]}]}}"#;
        assert!((meter().decode(vector).unwrap() - 452.0005).abs() < 1e-9);
        let scalar =
            br#"{"status":"success","data":{"resultType":"scalar","result":[1700000000,"1500"]}}"#;
        assert_eq!(meter().decode(scalar).unwrap(), 1.5);
    }

    #[test]
    fn errors_are_reported_not_guessed() {
        let cases: [&[u8]; 8] = [
            b"not json",
            br#"{"status":"error","errorType":"bad_data","error":"parse error"}"#,
            br#"{"status":"success","data":{"resultType":"vector","result":[]}}"#,
            br#"{"status":"success","data":{"resultType":"vector","result":[
                {"metric":{},"value":[1,"1"]},{"metric":{},"value":[1,"2"]}]}}"#,
            br#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#,
            br#"{"status":"success","data":{"resultType":"scalar","result":[1]}}"#,
            br#"{"status":"success","data":{"resultType":"scalar","result":[1,"abc"]}}"#,
            br#"{"data":{}}"#,
        ];
        for body in cases {
            assert!(
                matches!(parse_response(body), Err(MeterError::Format(_))),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        // NaN parses (Prometheus sends it) and is refused by the range check.
        let nan = br#"{"status":"success","data":{"resultType":"scalar","result":[1,"NaN"]}}"#;
        let v = parse_response(nan).unwrap();
        assert!(super::super::check_kw(v, 1e6).is_err());
    }
}
