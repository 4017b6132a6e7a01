//! Tally on a real node: see `tally_e2e::RealNode`.

use tally_e2e::ControlPlane;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke() {
    let control_plane = ControlPlane::builder()
        .with_real_node()
        .start()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("up: {}", control_plane.server_url());
}
