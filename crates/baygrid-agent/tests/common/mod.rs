//! What the agent's integration tests share: paths into the repository, and a local-engine
//! agent run in the test's own runtime.
#![allow(dead_code)] // each test file uses the parts it needs

use std::path::{Path, PathBuf};
use std::time::Duration;

use baygrid_agent::AgentConfig;
use baygrid_api::Client;
use baygrid_core::Role;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A path relative to the repository's root (`../shared/…` reaches beside it).
pub fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

/// Starts a local-engine agent for `cluster` working in `work_dir`, with a token the
/// operator issues. Sending `true` stops it; the handle ends when it has.
pub async fn start_agent(
    url: &str,
    operator: &Client,
    cluster: &str,
    work_dir: &Path,
) -> (watch::Sender<bool>, JoinHandle<()>) {
    start_agent_with(url, operator, cluster, work_dir, |c| c).await
}

/// [`start_agent`], with the config changed by `change` first.
pub async fn start_agent_with(
    url: &str,
    operator: &Client,
    cluster: &str,
    work_dir: &Path,
    change: impl FnOnce(AgentConfig) -> AgentConfig,
) -> (watch::Sender<bool>, JoinHandle<()>) {
    let issued = operator.issue(Role::Agent, Some(cluster)).await.unwrap();
    let config = change(AgentConfig {
        max_running: 8,
        poll_interval: Duration::from_millis(100),
        ..AgentConfig::local(
            url,
            issued.token().map(str::to_string),
            work_dir.to_path_buf(),
        )
    });
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(async move { baygrid_agent::run(config, stopped).await.unwrap() });
    (stop, task)
}

/// The job once it has ended (polled for up to a minute).
pub async fn wait_job_ended(client: &Client, id: &str) -> baygrid_api::JobView {
    for _ in 0..1200 {
        let job: baygrid_api::JobView = client.get(&format!("/api/v1/jobs/{id}")).await.unwrap();
        if job.state.is_terminal() {
            return job;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("job {id} never ended");
}

/// A console page as `client`'s token sees it: signs in with the token, then reads `path`.
pub async fn console_page(client: &Client, path: &str) -> (u16, String) {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let signed_in = http
        .post(format!("{}/console/login", client.base()))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={}", client.token().unwrap()))
        .send()
        .await
        .unwrap();
    assert_eq!(signed_in.status().as_u16(), 303);
    let cookie = signed_in.headers()["set-cookie"].to_str().unwrap();
    let cookie = cookie.split(';').next().unwrap().to_string();
    let page = http
        .get(format!("{}{path}", client.base()))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    (page.status().as_u16(), page.text().await.unwrap())
}
