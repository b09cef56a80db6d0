//! The console: signing in with a token, pages showing what that token may read and no
//! more, markup in user input shown as text, signing out.

use std::time::Duration;

use baygrid_api::{Client, JobView};
use baygrid_core::{JobSpec, Jurisdiction};
use baygrid_server::ServerConfig;

/// A browser without one: no redirects followed, the cookie carried by hand.
struct Browser {
    base: String,
    http: reqwest::Client,
    cookie: Option<String>,
}

impl Browser {
    fn new(base: &str) -> Browser {
        Browser {
            base: base.to_string(),
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            cookie: None,
        }
    }

    /// Posts a form; keeps the cookie the answer sets. Returns the status and the cookie
    /// header as set.
    async fn post(&mut self, path: &str, form: &str) -> (u16, Option<String>, String) {
        let mut request = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form.to_string());
        if let Some(cookie) = &self.cookie {
            request = request.header("cookie", cookie);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let set = response
            .headers()
            .get("set-cookie")
            .map(|v| v.to_str().unwrap().to_string());
        if let Some(set) = &set {
            let pair = set.split(';').next().unwrap().to_string();
            self.cookie = (!pair.ends_with('=')).then_some(pair);
        }
        (status, set, response.text().await.unwrap())
    }

    async fn get(&self, path: &str) -> (u16, reqwest::header::HeaderMap, String) {
        let mut request = self.http.get(format!("{}{path}", self.base));
        if let Some(cookie) = &self.cookie {
            request = request.header("cookie", cookie);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        (status, headers, response.text().await.unwrap())
    }
}

fn form_token(token: &str) -> String {
    format!("token={}", url_encode(token))
}

fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn the_console_shows_what_the_token_may_read_and_escapes_what_users_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let server = baygrid_server::start(ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_path_buf(),
        sites_file: "sample".into(),
        schedule_interval: Duration::from_millis(50),
        ..ServerConfig::default()
    })
    .await
    .unwrap();
    let base = server.url();
    let operator = Client::new(&base, Some(server.operator_token.clone()));
    let lab = operator
        .add_tenant(
            "gz-lab",
            Jurisdiction::CN,
            "guangzhou",
            "100.00 CNY".parse().unwrap(),
        )
        .await
        .unwrap();
    let bank = operator
        .add_tenant(
            "hk-bank",
            Jurisdiction::HK,
            "hong-kong",
            "100.00 CNY".parse().unwrap(),
        )
        .await
        .unwrap();
    let spec = |name: &str, command: &str| {
        JobSpec::from_yaml(&format!(
            "name: {name}\nresources: {{accelerators: {{H800: 1}}}}\ncommand: {command:?}\nestimated_duration: 1m\n"
        ))
        .unwrap()
    };
    // a command that is markup must show as text
    let lab_job: JobView = lab
        .post("/api/v1/jobs", &spec("lab-job", "echo '<b>bold</b>'"))
        .await
        .unwrap();
    let bank_job: JobView = bank
        .post("/api/v1/jobs", &spec("bank-job", "echo hi"))
        .await
        .unwrap();

    // not signed in: the form; a bad token is refused and sets nothing
    let mut browser = Browser::new(&base);
    let (status, headers, page) = browser.get("/console").await;
    assert_eq!(status, 200);
    assert!(page.contains("action=\"/console/login\""), "{page}");
    let policy = headers["content-security-policy"].to_str().unwrap();
    assert!(policy.contains("default-src 'none'"), "{policy}");
    let (status, set, page) = browser.post("/console/login", "token=bg_nope").await;
    assert_eq!(status, 401);
    assert!(set.is_none());
    assert!(page.contains("unknown or revoked token"), "{page}");
    let (status, _, page) = browser.post("/console/login", "token=").await;
    assert_eq!(status, 400);
    assert!(page.contains("token: paste a token"), "{page}");

    // the lab signs in: its own job, not the bank's, and no audit log for a tenant; the
    // job's page shows its command as text
    let (status, set, _) = browser
        .post("/console/login", &form_token(lab.token().unwrap()))
        .await;
    assert_eq!(status, 303);
    let set = set.unwrap();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/console"] {
        assert!(set.contains(attribute), "{set}");
    }
    let (status, _, page) = browser.get("/console").await;
    assert_eq!(status, 200);
    assert!(page.contains("signed in as tenant gz-lab"), "{page}");
    assert!(page.contains(&lab_job.id), "{page}");
    assert!(!page.contains(&bank_job.id), "{page}");
    assert!(page.contains("qianhai-h800"), "{page}");
    assert!(page.contains("wallet:gz-lab"), "{page}");
    assert!(!page.contains("wallet:hk-bank"), "{page}");
    assert!(page.contains("role tenant may not do this"), "{page}");
    let (status, _, page) = browser.get(&format!("/console/jobs/{}", lab_job.id)).await;
    assert_eq!(status, 200);
    assert!(
        page.contains("Every change of state") && page.contains("queued"),
        "{page}"
    );
    let (status, _, _) = browser.get(&format!("/console/jobs/{}", bank_job.id)).await;
    assert_eq!(status, 404);

    // the operator sees both tenants' jobs and the signed checkpoint
    let mut operator_browser = Browser::new(&base);
    operator_browser
        .post("/console/login", &form_token(&server.operator_token))
        .await;
    let (_, _, page) = operator_browser.get("/console").await;
    assert!(
        page.contains(&lab_job.id) && page.contains(&bank_job.id),
        "{page}"
    );
    assert!(page.contains("wallet:hk-bank"), "{page}");
    assert!(
        page.contains("— "),
        "the checkpoint's signature line: {page}"
    );

    // fifty jobs a page: the rest behind "older jobs", the oldest among them
    for i in 0..50 {
        let _: JobView = bank
            .post("/api/v1/jobs", &spec(&format!("bank-job-{i}"), "echo hi"))
            .await
            .unwrap();
    }
    let (_, _, page) = operator_browser.get("/console").await;
    assert!(!page.contains(&lab_job.id), "{page}");
    let older = page
        .split("href=\"")
        .find_map(|rest| rest.strip_prefix("/console/jobs?before="))
        .map(|rest| rest.split('"').next().unwrap().to_string())
        .unwrap_or_else(|| panic!("no link to older jobs: {page}"));
    let (status, _, page) = operator_browser
        .get(&format!("/console/jobs?before={older}"))
        .await;
    assert_eq!(status, 200);
    assert!(
        page.contains(&lab_job.id) && page.contains(&bank_job.id),
        "{page}"
    );
    assert!(!page.contains("bank-job-49"), "{page}");
    assert!(!page.contains("/console/jobs?before="), "{page}");

    // a revoked token signs the page out at once
    let tokens: Vec<serde_json::Value> = operator.get("/api/v1/tokens").await.unwrap();
    let lab_token = tokens.iter().find(|t| t["subject"] == "gz-lab").unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    operator
        .delete::<serde_json::Value>(&format!("/api/v1/tokens/{lab_token}"))
        .await
        .unwrap();
    let (status, _, page) = browser.get("/console").await;
    assert_eq!(status, 200);
    assert!(
        page.contains("signed out: unknown or revoked token"),
        "{page}"
    );
    assert!(!page.contains(&lab_job.id), "{page}");

    // signing out clears the cookie
    let (status, set, _) = operator_browser.post("/console/logout", "").await;
    assert_eq!(status, 303);
    assert!(set.unwrap().contains("Max-Age=0"));
    let (_, _, page) = operator_browser.get("/console").await;
    assert!(page.contains("action=\"/console/login\""), "{page}");
    server.stop().await;
}
