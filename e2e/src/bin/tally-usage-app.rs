//! The app of the real-node tests: a workload that meters its usage the way a user's service would, by POSTing
//! CloudEvents to `$OPENMETER_URL/api/v1/events`, one at a time, each retried until it is acknowledged (2xx).
//!
//! Environment: `OPENMETER_URL` (required), `EVENTS` (how many, default 100), `RATE` (events per second, default
//! as fast as each is acknowledged), `POD_NAME` (the ids are
//! `<POD_NAME>-<n>`), and `STAMP_NAMESPACE` (when set, each event carries `k8snamespace` with its value, as an
//! injected sidecar would stamp it). It prints `acknowledged <n>` as it goes and `done: acknowledged <n> events`
//! at the end, then stays up, as a Deployment's container must.

use std::{process::ExitCode, time::Duration};

use serde_json::json;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let Ok(base) = std::env::var("OPENMETER_URL") else {
        eprintln!("tally-usage-app: OPENMETER_URL is not set");
        return ExitCode::from(2);
    };
    let events: u64 = match std::env::var("EVENTS").map(|v| v.parse()) {
        Ok(Ok(n)) => n,
        Ok(Err(e)) => {
            eprintln!("tally-usage-app: EVENTS is not a count: {e}");
            return ExitCode::from(2);
        }
        Err(_) => 100,
    };
    let rate: f64 = match std::env::var("RATE").map(|v| v.parse()) {
        Ok(Ok(r)) if r > 0.0 => r,
        Ok(_) => {
            eprintln!("tally-usage-app: RATE must be a positive number of events per second");
            return ExitCode::from(2);
        }
        Err(_) => 0.0,
    };
    let mut tick = (rate > 0.0).then(|| tokio::time::interval(Duration::from_secs_f64(1.0 / rate)));
    let pod = std::env::var("POD_NAME").unwrap_or_else(|_| "app".into());
    let stamp = std::env::var("STAMP_NAMESPACE").ok();
    let url = format!("{}/api/v1/events", base.trim_end_matches('/'));
    let http = match reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
    {
        Ok(http) => http,
        Err(e) => {
            eprintln!("tally-usage-app: building the HTTP client: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("tally-usage-app: sending {events} events to {url}");
    for n in 0..events {
        if let Some(tick) = &mut tick {
            tick.tick().await;
        }
        let mut event = json!({
            "specversion": "1.0",
            "id": format!("{pod}-{n}"),
            "source": "tally-usage-app",
            "type": "api-calls",
            "subject": "customer-42",
            "data": { "calls": 1 },
        });
        if let Some(namespace) = &stamp {
            event["k8snamespace"] = json!(namespace);
        }
        loop {
            match http
                .post(&url)
                .header("content-type", "application/cloudevents+json")
                .body(event.to_string())
                .send()
                .await
            {
                Ok(response) if response.status().is_success() => break,
                Ok(response) => eprintln!("tally-usage-app: event {n}: {}", response.status()),
                Err(e) => eprintln!("tally-usage-app: event {n}: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if (n + 1) % 25 == 0 {
            println!("acknowledged {}", n + 1);
        }
    }
    println!("done: acknowledged {events} events");
    loop {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}
